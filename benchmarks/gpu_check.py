"""GPU readiness in one run: the tests on CUDA, the README's 256x256 sampling in fp16 and bf16 against
float32, sample_speed at 256x256 (with the fraction of the card's matrix rate) and the evaluator's
feature extraction, all written as JSON to OUTDIR/gpu_check.json.

    benchmarks/gpu_check.sh OUTDIR                               # on a machine with a CUDA GPU
    python benchmarks/gpu_check.py OUTDIR --device cpu --quick   # every piece, small, on the CPU

Each piece runs as its own process with a time limit; a piece that fails is recorded and the
others still run; the exit status is 0 only when every check passed. Sampling uses networks with
seeded random weights (the published architectures, no download): the images are noise, but
their agreement across precisions is what is checked. The float32 reference runs with
NVIDIA_TF32_OVERRIDE=0, so that it is true float32 on the card.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from guided_diffusion.checkpoints import DEFAULTS, OFFICIAL, build, parse_flags, write_sidecar  # noqa: E402
from guided_diffusion.script_util import randomize_zeroed_convs  # noqa: E402

# how far a reduced-precision image may be from float32's, in mean |difference| of uint8 levels
CLOSE_LEVELS = {"fp16": 2.0, "bf16": 4.0}
# sampling flags per precision, after the README's string (which asks for --use_fp16 True: ADM's fp16 conversion)
PRECISIONS = {"float32": ["--use_fp16", "False"], "fp16": ["--use_fp16", "True"], "bf16": ["--use_fp16", "False", "--autocast", "bf16"]}
QUICK_MODEL = "--image_size 32 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2 --attention_resolutions 16 --num_head_channels 32 --class_cond True --learn_sigma True"
QUICK_CLASSIFIER = "--image_size 32 --classifier_width 32 --classifier_depth 1 --classifier_attention_resolutions 8 --classifier_channel_mult 1,2"


def readme_flags():
    """The README's 256x256 classifier-guided flag string as a list: its MODEL_FLAGS, the command's own flags
    (the checkpoint paths left out) and its SAMPLE_FLAGS."""
    text = (ROOT / "README.md").read_text()
    strings = {name: re.search(rf'^{name}="([^"]+)"', text, re.M) for name in ("MODEL_FLAGS", "SAMPLE_FLAGS")}
    command = re.search(r"scripts/classifier_sample\.py \$MODEL_FLAGS(.*?)\$SAMPLE_FLAGS", text, re.S)
    if not all(strings.values()) or not command:
        raise SystemExit("gpu_check: README.md no longer has the 256x256 classifier_sample.py example (MODEL_FLAGS, SAMPLE_FLAGS): update readme_flags()")
    tokens = command.group(1).replace("\\\n", " ").split()
    own = [t for k, t in enumerate(tokens) if t not in ("--model_path", "--classifier_path") and tokens[k - 1] not in ("--model_path", "--classifier_path")]
    return strings["MODEL_FLAGS"].group(1).split() + own + strings["SAMPLE_FLAGS"].group(1).split()


def run(command, seconds, env=None):
    """Run a command from the repository root with a time limit: (return code or "timeout", stdout, stderr, seconds)."""
    started = time.time()
    try:
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=seconds, env=dict(os.environ, **(env or {})))
        status, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        status, stdout, stderr = "timeout", e.stdout or "", e.stderr or ""
    return status, stdout if isinstance(stdout, str) else stdout.decode(), stderr if isinstance(stderr, str) else stderr.decode(), time.time() - started


def environment(device):
    """What ran the check: versions, the device and its name."""
    info = dict(torch=torch.__version__, python=sys.version.split()[0], device=device, cpus=os.cpu_count())
    if device == "cuda":
        info.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda, capability=".".join(map(str, torch.cuda.get_device_capability(0))))
    return info


def run_tests(out, pytest_args, seconds):
    """The test suite (tests that take a device use CUDA when there is one): counts from pytest's JUnit XML."""
    report = out / "pytest.xml"
    status, stdout, stderr, took = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *pytest_args], seconds)
    counts = dict(tests=0, failures=0, errors=0, skipped=0)
    if report.exists():
        suite = ElementTree.parse(report).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in counts}
    return dict(passed=status == 0, status=status, seconds=round(took, 1), args=pytest_args, **counts, summary=(stdout.strip().splitlines() or [""])[-1], stderr=stderr[-2000:])


def seeded_checkpoints(folder, quick):
    """A model and a classifier with seeded random weights and their sidecars; returns their paths."""
    paths = {}
    for kind, flags in (("model", QUICK_MODEL if quick else OFFICIAL["256x256_diffusion.pt"][1]),
                        ("classifier", QUICK_CLASSIFIER if quick else OFFICIAL["256x256_classifier.pt"][1])):
        torch.manual_seed(0)
        net = randomize_zeroed_convs(build(kind, parse_flags(flags, DEFAULTS[kind]())))
        paths[kind] = folder / f"seeded_{kind}.pt"
        torch.save(net.state_dict(), paths[kind])
        write_sidecar(paths[kind], kind, flags)
    return paths


def sample_precisions(out, quick, seconds):
    """classifier_sample.py with the README's flags (4 samples, 4 steps, seeded) in float32, fp16 and bf16; each
    reduced-precision batch compared with float32's (the sampler itself refuses NaN or infinite values)."""
    folder = out / "sampling"
    folder.mkdir(parents=True, exist_ok=True)
    paths = seeded_checkpoints(folder, quick)
    flags = readme_flags()
    if quick:  # the README's guidance and sampling flags on the small architecture
        flags = [f for f in flags[flags.index("--classifier_scale"):]] + QUICK_MODEL.split()
    few = ["--num_samples", "4", "--batch_size", "4", "--timestep_respacing", "4", "--seed", "0", "--batch_invariant", "False", "--grid_size", "0"]
    results, images = {}, {}
    for precision, extra in PRECISIONS.items():
        command = [sys.executable, "scripts/classifier_sample.py", *flags, "--model_path", str(paths["model"]),
                   "--classifier_path", str(paths["classifier"]), *few, *extra, "--output", str(folder / precision)]
        status, _, stderr, took = run(command, seconds, env={"NVIDIA_TF32_OVERRIDE": "0"} if precision == "float32" else None)
        found = sorted((folder / precision).glob("samples_*.npz"))
        results[precision] = dict(status=status, seconds=round(took, 1), finite=status == 0, error=stderr.strip().splitlines()[-1:] if status else [])
        if status == 0 and found:
            with np.load(found[0]) as npz:
                images[precision] = npz["arr_0"].astype(np.int16)
    for precision, limit in CLOSE_LEVELS.items():
        if precision in images and "float32" in images:
            diff = np.abs(images[precision] - images["float32"])
            results[precision].update(mean_abs_levels=float(diff.mean()), max_abs_levels=int(diff.max()), limit_levels=limit, close=bool(diff.mean() <= limit))
        else:
            results[precision].update(close=False)
    return dict(passed=all(r["finite"] for r in results.values()) and all(results[p]["close"] for p in CLOSE_LEVELS), flags=flags + few, **results)


def parse_speed_table(text):
    """The rows of sample_speed.py's Markdown table as dicts keyed by its column names, and its title line."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    if len(lines) < 3:
        return None, []
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[2:]]
    title = next((line for line in text.splitlines() if line.startswith("arch ")), "")
    return title, rows


def sample_speed(quick, device, seconds):
    """benchmarks/sample_speed.py at 256x256 for fp16 and bf16, batches 8 and 32 (quick: the small architecture, batch 2)."""
    runs = []
    for dtype in ("fp16", "bf16"):
        for batch in (2,) if quick else (8, 32):
            options = ["--arch", "quick", "--repeats", "1", "--warmup", "0", "--modes", "none"] if quick else ["--arch", "256", "--repeats", "5", "--warmup", "2", "--modes", "none,cls_den"]
            status, stdout, stderr, took = run([sys.executable, "benchmarks/sample_speed.py", *options, "--device", device, "--dtype", dtype, "--batch_size", str(batch)], seconds)
            title, rows = parse_speed_table(stdout)
            runs.append(dict(dtype=dtype, batch_size=batch, status=status, seconds=round(took, 1), title=title, rows=rows,
                             error=stderr.strip().splitlines()[-1:] if status else []))
    return dict(passed=all(r["status"] == 0 and r["rows"] for r in runs), runs=runs)


def parse_evaluator_line(text):
    """(best, median) images per second from evaluator_speed.py's line, or None."""
    found = re.search(r"best ([\d.]+) images/s, median ([\d.]+) images/s", text)
    return (float(found.group(1)), float(found.group(2))) if found else None


def evaluator_speed(quick, device, seconds):
    """benchmarks/evaluator_speed.py: the InceptionV3 feature extraction's images per second."""
    options = ["--num_images", "4", "--image_size", "64", "--batch_size", "2", "--repeats", "1"] if quick else ["--num_images", "1024", "--batch_size", "128"]
    status, stdout, stderr, took = run([sys.executable, "benchmarks/evaluator_speed.py", *options, "--device", device], seconds)
    rates = parse_evaluator_line(stdout)
    return dict(passed=status == 0 and rates is not None, status=status, seconds=round(took, 1), line=stdout.strip(),
                best_images_per_s=rates and rates[0], median_images_per_s=rates and rates[1], error=stderr.strip().splitlines()[-1:] if status else [])


def summary(report):
    """A few lines for the terminal."""
    lines = [f"gpu_check on {report['environment'].get('gpu', report['environment']['device'])}: {'PASSED' if report['passed'] else 'FAILED'}"]
    tests = report["tests"]
    lines.append(f"  tests: {tests['tests']} run, {tests['failures']} failed, {tests['errors']} errors, {tests['skipped']} skipped ({tests['seconds']} s)")
    sampling = report["sampling"]
    for precision in CLOSE_LEVELS:
        r = sampling[precision]
        lines.append(f"  sampling {precision}: finite {r['finite']}, mean |diff| vs float32 {r.get('mean_abs_levels', float('nan')):.2f} levels (limit {CLOSE_LEVELS[precision]})")
    for r in report["sample_speed"]["runs"]:
        for row in r["rows"]:
            lines.append(f"  sample_speed {r['dtype']} batch {r['batch_size']} {row.get('pxp_mode')}: {row.get('ms/step')} ms/step, "
                         f"{row.get('TFLOP/s')} TFLOP/s, {row.get('% of matmul rate', 'n/a (no CUDA)')} of the matmul rate")
    lines.append(f"  evaluator: {report['evaluator']['line'] or report['evaluator']['error']}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", help="folder for gpu_check.json and the pieces' files")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="small networks and few tests: a dry run of every piece")
    parser.add_argument("--pytest", default="", help='pytest arguments (default: -m "not slow"; with --quick, one small test file)')
    parser.add_argument("--piece_seconds", type=int, default=300, help="time limit of each piece's process")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here (torch.cuda.is_available() is False): run it on a machine with one (or --device cpu --quick for a dry run)", file=sys.stderr)
        return 2
    out = Path(args.outdir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    pytest_args = args.pytest.split() if args.pytest else (["tests/test_precision.py", "-k", "unet_output"] if args.quick else ["-m", "not slow"])
    started = time.time()
    report = dict(environment=environment(args.device), quick=args.quick)
    report["tests"] = run_tests(out, pytest_args, args.piece_seconds)
    report["sampling"] = sample_precisions(out, args.quick, args.piece_seconds)
    report["sample_speed"] = sample_speed(args.quick, args.device, args.piece_seconds)
    report["evaluator"] = evaluator_speed(args.quick, args.device, args.piece_seconds)
    report["passed"] = all(report[piece]["passed"] for piece in ("tests", "sampling", "sample_speed", "evaluator"))
    report["seconds"] = round(time.time() - started, 1)
    with open(out / "gpu_check.json", "w") as f:
        json.dump(report, f, indent=1)
    print(summary(report))
    print(f"  {report['seconds']} s in all; everything in {out / 'gpu_check.json'}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
