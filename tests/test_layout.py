"""The layout is the architecture: every import arrow points down, from the command line to training to the pipeline
to the models, with no circle; no function is longer than about 60 lines."""
import ast
import glob
import os

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
    "scorers": 7,                                                # learned rewards: PickScore, HPSv2, aesthetic, CLIP
    "logplot": 7,                                                # a run's log drawn as a PNG
    "extract": 7,                                                # η from a full fine-tune as a LoRA (truncated SVD)
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
    """The project modules `name` imports, anywhere in the file (top level or inside functions)."""
    found = set()
    for node in ast.walk(module_tree(name)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.add(node.module)
    return found & LAYERS.keys()


def test_every_module_has_a_layer():
    # benchmarks/ is not library code: a folder of its own, outside LAYERS and the wheel
    modules = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "*.py"))}
    assert modules == LAYERS.keys()


def test_the_wheel_ships_every_module():
    with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as f:
        text = f.read()
    listed = text[text.index("py-modules = [") + len("py-modules = ["):].split("]")[0]
    assert {m.strip().strip('"') for m in listed.split(",") if m.strip()} == LAYERS.keys()


def test_imports_point_down():
    upward = [(m, d) for m in LAYERS for d in project_imports(m) if LAYERS[d] <= LAYERS[m]]
    assert upward == []


def module_lines():
    """{module: its number of lines}, for every module of the project."""
    return {name: len(open(os.path.join(ROOT, f"{name}.py"), encoding="utf-8").read().splitlines()) for name in LAYERS}


def test_modules_are_short():
    """A reader finds each concern on its own page: no training module over 500 lines (train.py, its config, its
    machinery and each method), no module of the project over 700."""
    lines = module_lines()
    training = {m for m in LAYERS if m == "train" or m.startswith(("train", "method_")) or m in ("machinery", "runs")}
    assert {m: n for m, n in lines.items() if m in training and n > 500} == {}
    assert {m: n for m, n in lines.items() if n > 700} == {}


def test_functions_are_short():
    long = []
    for path in [p for folder in ("", "weights", "benchmarks") for p in glob.glob(os.path.join(ROOT, folder, "*.py"))]:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        long += [f"{os.path.basename(path)}:{n.name} ({n.end_lineno - n.lineno + 1} lines)" for n in ast.walk(tree)
                 if isinstance(n, ast.FunctionDef) and n.end_lineno - n.lineno + 1 > 60]
    assert long == []
