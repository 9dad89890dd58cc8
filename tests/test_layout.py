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
    "train": 2,                                                  # training
    "evaluate": 2,                                               # scoring folders of samples
    "runs": 3, "data": 3, "losses": 3, "rewards": 3, "shapes": 3, "ddpo": 3, "pipeline": 3,  # its parts; the pipeline
    "scorers": 4,                                                # learned rewards: PickScore, HPSv2, aesthetic, CLIP
    "images": 5, "unet": 5, "clip": 5, "blip": 5, "lora": 5, "sampler": 5, "shards": 5,  # models, sampling; parquet shards
    "singlefile": 5,                                             # single-file checkpoints unpacked to diffusers' layout
    "prompt_syntax": 5,                                          # A1111's emphasis and long prompts, for the text encoders
    "distributed": 5,                                            # torchrun's ranks sharing sampling and scoring
    "checkpoint": 6,                                             # files and the one user-facing error
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


def test_functions_are_short():
    long = []
    for path in [p for folder in ("", "weights", "benchmarks") for p in glob.glob(os.path.join(ROOT, folder, "*.py"))]:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        long += [f"{os.path.basename(path)}:{n.name} ({n.end_lineno - n.lineno + 1} lines)" for n in ast.walk(tree)
                 if isinstance(n, ast.FunctionDef) and n.end_lineno - n.lineno + 1 > 60]
    assert long == []
