"""The layout is the architecture: every import arrow points down, from the command line to training to the pipeline
to the models, with no circle; no function is longer than about 60 lines. The modules are one import package, `npo`:
they import each other relatively (`from . import unet`), never by a bare top-level name, and none edits sys.path."""
import ast
import glob
import os
import re

from conftest import ROOT

# Higher numbers are lower layers; a module may import only modules of a lower layer (a higher number).
LAYERS = {
    "npo": 0,                                                    # the command line
    "experiment": 1,
    "sample": 1,                                                 # npo.py sample: jobs, batches, PNGs with their parameters
    "reproduce": 1,                                              # one command per table of the paper (recipes/)
    "train": 2,                                                  # training: the loop and the table of methods
    "evaluate": 2,                                               # scoring folders of samples
    "method_dpo": 3, "method_reward": 3, "method_ddpo": 3, "method_spo": 3,      # one module per training method
    "machinery": 4,                                              # a run's machinery: resume, DDP, mixed precision, log
    "trainflags": 4,                                             # the flags of npo.py train, their defaults in --help
    "trainconfig": 5,                                            # TrainConfig, the flags and their checks
    "guiders": 5,                                                # SEG and autoguidance beside eq. 10, their flags
    "runs": 6, "data": 6, "losses": 6, "rewards": 6, "shapes": 6,  # their parts
    "guided": 6,                                                 # eq. 10 on a loaded pipeline, generate
    "pipeline": 7,                                               # loading a model, encoding prompts
    "videocrafter": 7.25,                                        # VideoCrafter2's model.ckpt into the video UNet (between
                                                                 # the pipeline and the models it builds)
    "scorers": 7,                                                # learned rewards: PickScore, HPSv2, aesthetic, CLIP
    "logplot": 7,                                                # a run's log drawn as a PNG
    "videos": 7,                                                 # videos on disk: frames + WebP preview, parameters
    "extract": 7,                                                # η from a full fine-tune as a LoRA (truncated SVD)
    "video": 7.5,                                                # the video UNet, built on unet.py's blocks
    "images": 8, "unet": 8, "clip": 8, "blip": 8, "lora": 8, "sampler": 8, "shards": 8,  # models, sampling; parquet shards
    "singlefile": 8,                                             # single-file checkpoints unpacked to diffusers' layout
    "prompt_syntax": 8,                                          # A1111's emphasis and long prompts, for the text encoders
    "distributed": 8,                                            # torchrun's ranks sharing sampling and scoring
    "checkpoint": 9,                                             # files and the one user-facing error
}


def module_tree(name):
    with open(os.path.join(ROOT, f"{name}.py"), encoding="utf-8") as f:
        return ast.parse(f.read())


def project_imports(name):
    """The project modules `name` imports, anywhere in the file (top level or inside functions): relatively
    (`from . import a`, `from .a import x`) or, in npo.py, through the package's name (`from npo import a`)."""
    found = set()
    for node in ast.walk(module_tree(name)):
        if isinstance(node, ast.ImportFrom) and (node.level == 1 or node.module == "npo"):
            found |= {a.name for a in node.names} if node.module in (None, "npo") else {node.module}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("npo."):
            found.add(node.module.split(".")[1])
    return found & LAYERS.keys()


def bare_imports(name):
    """Project modules imported by a bare top-level name (`import clip`): in an install they do not exist."""
    found = set()
    for node in ast.walk(module_tree(name)):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.add((node.module or "").split(".")[0])
    return found & (LAYERS.keys() - {"npo"})


def test_every_module_has_a_layer():
    modules = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "*.py"))}
    assert modules == LAYERS.keys()


def test_the_wheel_is_one_package_of_this_folder():
    with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as f:
        text = f.read()
    packages = re.search(r"^packages = \[(.*?)\]", text, re.S | re.M).group(1)
    names = [n.strip().strip('"') for n in packages.split(",")]
    assert 'package-dir = {"npo" = "."}' in text and "py-modules" not in text
    assert names[0] == "npo" and all(n.startswith("npo.weights") for n in names[1:])  # the model's folders only
    folders = {os.path.relpath(d, ROOT).replace(os.sep, ".") for d, _, _ in os.walk(os.path.join(ROOT, "weights"))
               if "__pycache__" not in d}
    assert set(names[1:]) == {"npo." + f for f in folders}


def test_imports_point_down():
    upward = [(m, d) for m in LAYERS for d in project_imports(m) if LAYERS[d] <= LAYERS[m]]
    assert upward == []


def test_modules_import_each_other_as_one_package():
    assert {m: bare_imports(m) for m in LAYERS if bare_imports(m)} == {}
    # only the command line names the package; every other module is relative, so the folder can have any name
    assert [m for m in LAYERS if m != "npo" and any(
        isinstance(n, ast.ImportFrom) and n.level == 0 and (n.module or "").split(".")[0] == "npo"
        for n in ast.walk(module_tree(m)))] == []


def test_no_module_edits_sys_path():
    editing = [m for m in LAYERS for n in ast.walk(module_tree(m))
               if isinstance(n, ast.Attribute) and n.attr == "path" and isinstance(n.value, ast.Name)
               and n.value.id == "sys"]
    assert editing == []



def module_lines():
    """{module: its number of lines}, for every module of the project."""
    return {name: len(open(os.path.join(ROOT, f"{name}.py"), encoding="utf-8").read().splitlines()) for name in LAYERS}


def test_modules_are_short():
    """A reader finds each concern on its own page: no training module over 500 lines (train.py, its config, its
    flags, its machinery and each method), no module of the project over 700."""
    lines = module_lines()
    training = {m for m in LAYERS if m == "train" or m.startswith(("train", "method_")) or m in ("machinery", "runs")}
    assert {m: n for m, n in lines.items() if m in training and n > 500} == {}
    assert {m: n for m, n in lines.items() if n > 700} == {}


def test_benchmarks_import_no_tests_and_edit_no_path():
    """benchmarks/ is not library code (outside LAYERS and the wheel), but it imports npo as a user would: not
    tests/ through sys.path, and it never edits sys.path."""
    for path in glob.glob(os.path.join(ROOT, "benchmarks", "*.py")):
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not imported & {"conftest", "tests", "ldm"} - {"benchmarks"}, path
        assert not [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "path"
                    and isinstance(n.value, ast.Name) and n.value.id == "sys"], path


def test_functions_are_short():
    long = []
    for path in [p for folder in ("", "weights", "benchmarks") for p in glob.glob(os.path.join(ROOT, folder, "*.py"))]:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        long += [f"{os.path.basename(path)}:{n.name} ({n.end_lineno - n.lineno + 1} lines)" for n in ast.walk(tree)
                 if isinstance(n, ast.FunctionDef) and n.end_lineno - n.lineno + 1 > 60]
    assert long == []
