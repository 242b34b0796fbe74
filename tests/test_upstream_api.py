"""Our modules accept every call that openai/guided-diffusion's accept (our API is a superset).

tests/upstream_api.json lists upstream's public names as data: constants with their values,
aliases, functions and methods with their signatures as upstream wrote them, and classes with
their bases and attributes. Each test checks one module with `inspect`: every name exists, every
upstream parameter is in our signature at the same position with the same name, kind and
default, and every parameter we add is optional. Regenerate the table from an upstream checkout
with `python tests/test_upstream_api.py PATH/TO/guided-diffusion` (it reads the source, and runs
upstream's script_util only for its flag defaults, which the table also holds).
"""

import ast
import enum
import functools
import importlib
import inspect
import json
import sys
from abc import ABC
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

TABLE_PATH = Path(__file__).with_name("upstream_api.json")
MODULES = (
    "script_util", "gaussian_diffusion", "respace", "unet", "dist_util", "fp16_util",
    "nn", "logger", "resample", "losses", "image_datasets", "train_util",
)
# names with a leading underscore that code built on upstream is known to use (by module, or by
# class for methods)
PRIVATE_NAMES_IN_USE = {
    "respace": ["_WrappedModel"],
    "image_datasets": ["_list_image_files_recursively"],
    "gaussian_diffusion": ["_extract_into_tensor"],
    "GaussianDiffusion": ["_predict_xstart_from_eps", "_predict_eps_from_xstart", "_vb_terms_bpd", "_prior_bpd"],
}
# upstream's base classes that live outside its modules
EXTERNAL_BASES = {
    "object": object, "ABC": ABC, "enum.Enum": enum.Enum, "Dataset": Dataset,
    "nn.Module": torch.nn.Module, "nn.GroupNorm": torch.nn.GroupNorm, "nn.Sequential": torch.nn.Sequential,
    "th.autograd.Function": torch.autograd.Function,
}


def parse_signature(text):
    """[(name, kind, default)] of a signature written as source, e.g. "(x, *, k=1, **kw)".

    default is inspect.Parameter.empty when there is none, and Ellipsis when upstream's default
    is an expression (a module constant, a call) rather than a literal.
    """
    args = ast.parse(f"def f{text}: pass").body[0].args
    P = inspect.Parameter

    def default(node):
        if node is None:
            return P.empty
        try:
            return ast.literal_eval(node)
        except ValueError:
            return ...

    positional = args.posonlyargs + args.args
    padded = [None] * (len(positional) - len(args.defaults)) + args.defaults
    params = [(a.arg, P.POSITIONAL_ONLY if a in args.posonlyargs else P.POSITIONAL_OR_KEYWORD, default(d)) for a, d in zip(positional, padded)]
    if args.vararg:
        params.append((args.vararg.arg, P.VAR_POSITIONAL, P.empty))
    params += [(a.arg, P.KEYWORD_ONLY, default(d)) for a, d in zip(args.kwonlyargs, args.kw_defaults)]
    if args.kwarg:
        params.append((args.kwarg.arg, P.VAR_KEYWORD, P.empty))
    return params


def signature_problems(ours, upstream_text):
    """How a callable's signature fails to accept every call upstream's accepts (empty: it does)."""
    upstream = parse_signature(upstream_text)
    mine = list(inspect.signature(ours).parameters.values())
    problems = []
    for i, (name, kind, default) in enumerate(upstream):
        if i >= len(mine) or mine[i].name != name or mine[i].kind != kind:
            found = f"{mine[i].name} ({mine[i].kind.name})" if i < len(mine) else "nothing"
            problems.append(f"parameter {i} should be {name} ({kind.name}), found {found}")
            continue
        if default is not inspect.Parameter.empty:
            if mine[i].default is inspect.Parameter.empty:
                problems.append(f"{name} needs a default")
            elif default is not ... and mine[i].default != default:
                problems.append(f"{name} defaults to {mine[i].default!r}, upstream {default!r}")
    for p in mine[len(upstream):]:
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.default is p.empty:
            problems.append(f"added parameter {p.name} has no default")
    return problems


def class_problems(cls, module, spec):
    """Missing methods, class attributes, bases and signature mismatches of a class."""
    problems = []
    for base in spec["bases"]:
        expected = getattr(module, base) if hasattr(module, base) else EXTERNAL_BASES.get(base)
        if expected is None or not issubclass(cls, expected):
            problems.append(f"not a subclass of {base}")
    for name in spec["class_attributes"]:
        if name not in dir(cls):
            problems.append(f"class attribute {name} missing")
    for name, text in spec["methods"].items():
        method = inspect.getattr_static(cls, name, None)
        if method is None:
            problems.append(f"method {name} missing")
            continue
        static = isinstance(method, staticmethod)
        if static != (name in spec["staticmethods"]):
            problems.append(f"{name}: staticmethod {static}, upstream {not static}")
        problems += [f"{name}: {p}" for p in signature_problems(getattr(cls, name), text)]
    return problems


@functools.cache
def table():
    """The stored table of upstream's names."""
    return json.loads(TABLE_PATH.read_text())


@pytest.mark.parametrize("module_name", MODULES)
def test_module_accepts_upstream_calls(module_name):
    module = importlib.import_module(f"guided_diffusion.{module_name}")
    spec = table()["modules"][module_name]
    problems = []
    for name, value in spec["constants"].items():
        if not hasattr(module, name):
            problems.append(f"constant {name} missing")
        elif value is not None and getattr(module, name) != value:
            problems.append(f"{name} = {getattr(module, name)!r}, upstream {value!r}")
    for name, target in spec["aliases"].items():
        if getattr(module, name, None) is not getattr(module, target):
            problems.append(f"{name} should be {target}")
    for name, text in spec["functions"].items():
        if not hasattr(module, name):
            problems.append(f"function {name} missing")
        else:
            problems += [f"{name}: {p}" for p in signature_problems(getattr(module, name), text)]
    for name, class_spec in spec["classes"].items():
        if not inspect.isclass(getattr(module, name, None)):
            problems.append(f"class {name} missing")
        else:
            problems += [f"{name}.{p}" for p in class_problems(getattr(module, name), module, class_spec)]
    assert not problems, "\n".join(problems)


def test_flag_defaults_are_upstreams():
    """Upstream's scripts build their flags from these: every upstream flag, with its default."""
    from guided_diffusion import script_util

    for name, upstream in table()["flag_defaults"].items():
        ours = getattr(script_util, name)()
        assert {k: ours.get(k, "(missing)") for k in upstream} == upstream, name


# ---------------------------------------------------------------- instance attributes


def _instances(tmp_path):
    """One small instance of each upstream class that sets public attributes in __init__."""
    from guided_diffusion import fp16_util, gaussian_diffusion as gd, logger, resample, respace, unet
    from guided_diffusion.image_datasets import ImageDataset

    betas = gd.get_named_beta_schedule("linear", 100)
    diffusion_kwargs = dict(betas=betas, model_mean_type=gd.ModelMeanType.EPSILON, model_var_type=gd.ModelVarType.FIXED_SMALL, loss_type=gd.LossType.MSE)
    net_kwargs = dict(image_size=8, in_channels=3, model_channels=32, out_channels=3, num_res_blocks=1, attention_resolutions=(2,), channel_mult=(1, 2))
    diffusion = gd.GaussianDiffusion(**diffusion_kwargs)
    net = unet.UNetModel(**net_kwargs, num_classes=10)
    return {
        ("gaussian_diffusion", "GaussianDiffusion"): diffusion,
        ("respace", "SpacedDiffusion"): respace.SpacedDiffusion(use_timesteps=[0, 50, 99], **diffusion_kwargs),
        ("respace", "_WrappedModel"): respace._WrappedModel(net, [0, 50, 99], False, 100),
        ("unet", "AttentionPool2d"): unet.AttentionPool2d(2, 32, 16, 4),
        ("unet", "Upsample"): unet.Upsample(32, True),
        ("unet", "Downsample"): unet.Downsample(32, True),
        ("unet", "ResBlock"): unet.ResBlock(32, 128, 0.0),
        ("unet", "AttentionBlock"): unet.AttentionBlock(32),
        ("unet", "QKVAttentionLegacy"): unet.QKVAttentionLegacy(2),
        ("unet", "QKVAttention"): unet.QKVAttention(2),
        ("unet", "UNetModel"): net,
        ("unet", "SuperResModel"): unet.SuperResModel(**net_kwargs),
        ("unet", "EncoderUNetModel"): unet.EncoderUNetModel(**net_kwargs),
        ("fp16_util", "MixedPrecisionTrainer"): fp16_util.MixedPrecisionTrainer(model=net),
        ("logger", "HumanOutputFormat"): logger.HumanOutputFormat(sys.stdout),
        ("logger", "JSONOutputFormat"): logger.JSONOutputFormat(str(tmp_path / "progress.json")),
        ("logger", "CSVOutputFormat"): logger.CSVOutputFormat(str(tmp_path / "progress.csv")),
        ("logger", "Logger"): logger.Logger(None, []),
        ("resample", "UniformSampler"): resample.UniformSampler(diffusion),
        ("resample", "LossSecondMomentResampler"): resample.LossSecondMomentResampler(diffusion),
        ("image_datasets", "ImageDataset"): ImageDataset(8, []),
    }


def test_instances_have_upstream_attributes(tmp_path):
    instances = _instances(tmp_path)
    with_attributes = {(m, c): s["attributes"] for m in MODULES for c, s in table()["modules"][m]["classes"].items() if s["attributes"]}
    # TrainLoop's are checked in test_training.py, TensorBoardOutputFormat's need tensorboard
    assert set(with_attributes) - set(instances) == {("train_util", "TrainLoop"), ("logger", "TensorBoardOutputFormat")}
    for key, obj in instances.items():
        missing = [a for a in with_attributes.get(key, ()) if not hasattr(obj, a)]
        assert not missing, f"{key} lacks {missing}"


# ---------------------------------------------------------------- behaviour of the names added for upstream


def test_logger_formats_write_files_and_append_on_reconfigure(tmp_path):
    from guided_diffusion import logger

    def run(values_per_dump):
        with logger.scoped_configure(dir=str(tmp_path), format_strs=["log", "json", "csv"]):
            logger.log("hello", 3)
            for values in values_per_dump:
                logger.logkvs(values)
                assert logger.dumpkvs() == values

    run([{"loss": 0.5}, {"loss": 0.25, "step": 2}])
    run([{"grad_norm": 1.5}])  # a resumed run appends, with a new key
    assert (tmp_path / "progress.csv").read_text().splitlines() == ["loss,step,grad_norm", "0.5,,", "0.25,2,", ",,1.5"]
    assert [json.loads(line) for line in (tmp_path / "progress.json").read_text().splitlines()] == [{"loss": 0.5}, {"loss": 0.25, "step": 2}, {"grad_norm": 1.5}]
    text = (tmp_path / "log.txt").read_text()
    assert text.count("Logging to") == text.count("hello 3") == 2
    assert "| loss | 0.25     |" in text and "| step | 2        |" in text


def test_logger_scopes_levels_profile_and_reset(tmp_path, monkeypatch, capsys):
    from guided_diffusion import logger

    monkeypatch.setattr(logger.Logger, "CURRENT", None)
    monkeypatch.setattr(logger.Logger, "DEFAULT", None)
    monkeypatch.setenv("OPENAI_LOGDIR", str(tmp_path / "default"))
    monkeypatch.setenv("OPENAI_LOG_FORMAT", "log")
    default = logger.get_current()
    assert logger.Logger.DEFAULT is default and logger.get_dir() == str(tmp_path / "default")
    with logger.scoped_configure(dir=str(tmp_path / "inner"), format_strs=["log"]):
        assert logger.get_dir() == str(tmp_path / "inner")
    assert logger.get_current() is default
    logger.configure(dir=str(tmp_path / "other"), format_strs=["log"])
    logger.set_level(logger.WARN)
    logger.info("not written")
    logger.warn("written")

    @logger.profile("work")
    def work():
        return 7

    assert work() == 7 and logger.getkvs()["wait_work"] >= 0
    logger.reset()
    assert logger.get_current() is default
    assert (tmp_path / "other" / "log.txt").read_text().splitlines() == ["Logging to " + str(tmp_path / "other"), "written"]
    assert (tmp_path / "default" / "log.txt").read_text().endswith("Reset logger\n")
    monkeypatch.setenv("PMI_RANK", "3")
    assert logger.get_rank_without_mpi_import() == 3


def test_tensorboard_format_names_the_missing_package(tmp_path, monkeypatch):
    from guided_diffusion import logger
    from guided_diffusion.errors import UsageError

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as when tensorboard is not installed
    with pytest.raises(UsageError, match="^the tensorboard log format needs the tensorboard package: pip install tensorboard$"):
        logger.make_output_format("tensorboard", str(tmp_path))


def test_checkpoint_function_and_silu_match_plain_autograd():
    from guided_diffusion import nn as gnn

    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 4)
    x = torch.randn(3, 4, requires_grad=True)

    def func(inputs):
        return gnn.SiLU()(layer(inputs))

    assert torch.allclose(func(x), layer(x) * torch.sigmoid(layer(x)))
    params = tuple(layer.parameters())
    plain = torch.autograd.grad(func(x).square().sum(), (x, *params))
    for out in (gnn.CheckpointFunction.apply(func, 1, x, *params), gnn.checkpoint(func, (x,), params, True)):
        grads = torch.autograd.grad(out.square().sum(), (x, *params))
        assert all(torch.allclose(a, b) for a, b in zip(grads, plain))


def test_attention_flop_counter():
    from guided_diffusion import unet

    attention = unet.QKVAttention(2)
    attention.total_ops = torch.zeros(1, dtype=torch.float64)  # what thop registers
    qkv = torch.randn(3, 3 * 2 * 8, 16)  # N=3, heads=2, C=8, T=16
    unet.QKVAttention.count_flops(attention, (qkv,), attention(qkv))
    assert attention.total_ops.item() == 2 * 3 * 16**2 * (2 * 8)
    assert not isinstance(attention, unet.QKVAttentionLegacy) and not isinstance(unet.QKVAttentionLegacy(2), unet.QKVAttention)


def test_wrapped_model_passes_original_timesteps():
    from guided_diffusion.respace import _WrappedModel

    seen = []
    model = _WrappedModel(lambda x, t, **kw: seen.append((t, kw)) or x, [0, 50, 99], True, 100)
    model(torch.zeros(2), torch.tensor([2, 1]), y=5)
    assert torch.equal(seen[0][0], torch.tensor([990.0, 500.0])) and seen[0][1] == {"y": 5}


def test_image_files_listed_under_upstreams_name(tmp_path):
    from guided_diffusion import image_datasets

    for name in ("b.png", "a.JPG", "notes.txt", "png", "sub/c.gif"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    expected = [str(tmp_path / n) for n in ("a.JPG", "b.png", "sub/c.gif")]
    assert image_datasets._list_image_files_recursively(str(tmp_path)) == expected


# ---------------------------------------------------------------- the table itself


def test_table_parser_reads_kinds_and_defaults():
    P = inspect.Parameter
    assert parse_signature("(a, b=2, *args, c, d=(1, 2), e=X, **kw)") == [
        ("a", P.POSITIONAL_OR_KEYWORD, P.empty),
        ("b", P.POSITIONAL_OR_KEYWORD, 2),
        ("args", P.VAR_POSITIONAL, P.empty),
        ("c", P.KEYWORD_ONLY, P.empty),
        ("d", P.KEYWORD_ONLY, (1, 2)),
        ("e", P.KEYWORD_ONLY, ...),
        ("kw", P.VAR_KEYWORD, P.empty),
    ]


def test_signature_check_catches_incompatible_calls():
    def renamed(a, bb=2): ...
    def moved(b=2, a=None): ...
    def required_extra(a, b=2, c=None, *, d): ...
    def other_default(a, b=3): ...
    def superset(a, b=2, c=None, *args, d=1, **kwargs): ...

    assert signature_problems(renamed, "(a, b=2)") == ["parameter 1 should be b (POSITIONAL_OR_KEYWORD), found bb (POSITIONAL_OR_KEYWORD)"]
    assert signature_problems(moved, "(a, b=2)")[0].startswith("parameter 0 should be a")
    assert signature_problems(required_extra, "(a, b=2)") == ["added parameter d has no default"]
    assert signature_problems(other_default, "(a, b=2)") == ["b defaults to 3, upstream 2"]
    assert signature_problems(superset, "(a, b=2)") == []


def test_table_covers_every_module():
    modules = table()["modules"]
    assert set(modules) == set(MODULES) and all(any(spec.values()) for spec in modules.values())
    names = sum(
        len(spec["constants"]) + len(spec["aliases"]) + len(spec["functions"])
        + sum(1 + len(c["methods"]) + len(c["class_attributes"]) for c in spec["classes"].values())
        for spec in modules.values()
    )
    assert names > 200


# ---------------------------------------------------------------- regenerating the table


def _describe_module(tree, private_in_use):
    """The public names of one upstream module's syntax tree, as table entries."""
    entry = dict(constants={}, aliases={}, functions={}, classes={})
    public = lambda name: not name.startswith("_") or name in private_in_use  # noqa: E731
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if not public(name):
                continue
            if isinstance(node.value, ast.Name):
                entry["aliases"][name] = node.value.id
            else:
                try:
                    entry["constants"][name] = ast.literal_eval(node.value)
                except ValueError:
                    entry["constants"][name] = None
        elif isinstance(node, ast.FunctionDef) and public(node.name):
            entry["functions"][node.name] = _signature_text(node)
        elif isinstance(node, ast.ClassDef) and public(node.name):
            entry["classes"][node.name] = _describe_class(node)
    return entry


def _describe_class(node):
    """Bases, class attributes, methods (with signatures) and __init__'s public attributes of a class."""
    methods = [n for n in node.body if isinstance(n, ast.FunctionDef)]
    kept = [m for m in methods if not m.name.startswith("_") or m.name in ("__init__", "__call__") or m.name in PRIVATE_NAMES_IN_USE.get(node.name, ())]
    init = next((m for m in methods if m.name == "__init__"), None)
    attributes = []
    for sub in ast.walk(init) if init else ():
        if isinstance(sub, ast.Attribute) and isinstance(sub.ctx, ast.Store) and isinstance(sub.value, ast.Name) and sub.value.id == "self" and not sub.attr.startswith("_") and sub.attr not in attributes:
            attributes.append(sub.attr)
    return dict(
        bases=[ast.unparse(b) for b in node.bases] or ["object"],
        class_attributes=[t.id for n in node.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name) and not t.id.startswith("_")],
        methods={m.name: _signature_text(m) for m in kept},
        staticmethods=[m.name for m in kept if any(ast.unparse(d) == "staticmethod" for d in m.decorator_list)],
        attributes=attributes,
    )


def _signature_text(func):
    """A function's parameter list as upstream wrote it, without annotations."""
    args = func.args
    for arg in args.posonlyargs + args.args + args.kwonlyargs + [args.vararg, args.kwarg]:
        if arg is not None:
            arg.annotation = None
    return f"({ast.unparse(args)})"


def _resolve_forwarding_methods(modules):
    """Replace `(self, first, *args, **kwargs)` overrides by the signature of the method they forward to."""
    classes = {name: spec for m in modules.values() for name, spec in m["classes"].items()}
    for spec in classes.values():
        for name, text in spec["methods"].items():
            if text.endswith("*args, **kwargs)") and name != "__init__":
                for base in spec["bases"]:
                    if name in classes.get(base, {}).get("methods", {}):
                        spec["methods"][name] = classes[base]["methods"][name]


# run in the upstream checkout: prints the value of each script_util.*_defaults() as JSON
FLAG_DEFAULTS_PROGRAM = """
import json
from guided_diffusion import script_util
names = [n for n in dir(script_util) if n.endswith("_defaults")]
print(json.dumps({n: getattr(script_util, n)() for n in names}))
"""


def regenerate(upstream_root):
    """Write tests/upstream_api.json from a checkout of openai/guided-diffusion."""
    import subprocess

    root = Path(upstream_root)
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    modules = {
        name: _describe_module(ast.parse((root / "guided_diffusion" / f"{name}.py").read_text()), PRIVATE_NAMES_IN_USE.get(name, ()))
        for name in MODULES
    }
    _resolve_forwarding_methods(modules)
    flag_defaults = subprocess.run(
        [sys.executable, "-c", FLAG_DEFAULTS_PROGRAM], cwd=root, capture_output=True, text=True, check=True
    ).stdout
    table = {
        "about": f"public API of openai/guided-diffusion {commit or '(commit unknown)'}; regenerate: python tests/test_upstream_api.py PATH",
        "modules": modules,
        "flag_defaults": json.loads(flag_defaults),
    }
    TABLE_PATH.write_text(json.dumps(table, indent=1) + "\n")


if __name__ == "__main__":
    regenerate(sys.argv[1])
