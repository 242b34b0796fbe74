"""The benchmark scripts run in their quick modes."""

import json
import sys

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

import multi_objective  # noqa: E402
import sample_speed  # noqa: E402
import steps_tradeoff  # noqa: E402


@pytest.mark.parametrize("options, title", [([], "cpu, float32,"), (["--dtype", "bf16", "--channels_last", "True"], "cpu, bf16, channels_last,")])
def test_sample_speed_quick(options, title):
    quick = ["--arch", "quick", "--device", "cpu", "--batch_size", "2", "--repeats", "1", "--warmup", "0", "--modes", "none,cls_den_div2"]
    table = sample_speed.main(quick + options)
    assert title in table.splitlines()[0] and "GFLOP per step" in table.splitlines()[0]
    rows = [line.split("|") for line in table.splitlines() if line.startswith("| none") or line.startswith("| cls_den_div2")]
    assert len(rows) == 2
    assert float(rows[0][2]) > 0 and float(rows[0][4]) > 0  # ms/step and TFLOP/s
    assert "%" in rows[1][5] and "%" in rows[1][6]  # PxP overhead and combine share


def test_known_pixels_guidance_is_the_gradient_of_the_noised_known_region():
    known, mask, targets, own = multi_objective.inpainting_task(400)
    assert (targets != own).all() and set(targets.tolist()) == set(range(10))  # another class, every class a target
    assert mask[..., :4].eq(1).all() and mask[..., 4:].eq(0).all()
    alphas_cumprod = torch.linspace(0.99, 0.01, 1000).double().numpy()
    t = torch.randint(0, 1000, (len(known),))
    x = torch.randn_like(known).requires_grad_(True)
    a = torch.from_numpy(alphas_cumprod).float()[t].view(-1, 1, 1, 1)
    log_q = -((mask * (x - a.sqrt() * known)) ** 2 / (2 * (1 - a))).sum()
    expected = 0.3 * torch.autograd.grad(log_q, x)[0]
    torch.testing.assert_close(multi_objective.known_pixels_guidance(known, mask, alphas_cumprod, 0.3)(x.detach(), t), expected)


def test_multi_objective_guidance_is_summed_or_named():
    x, t = torch.randn(2, 3, 8, 8), torch.zeros(2, dtype=torch.long)
    cls, known = (lambda x, t, **kw: x + 1), (lambda x, t, **kw: 2 * x)
    by_name = {s.name: s for s in multi_objective.SETTINGS}
    named = multi_objective.guidance_for(by_name["cls_den_div2 projected"], cls, known)(x, t, y=None)
    assert set(named) == {"cls", "known"}
    summed = multi_objective.guidance_for(by_name["cls_den_div2 summed"], cls, known)(x, t, y=None)
    torch.testing.assert_close(summed, named["cls"] + named["known"])
    torch.testing.assert_close(multi_objective.guidance_for(by_name["inpainting only (ADM-G)"], cls, known)(x, t), 2 * x)


@pytest.mark.slow
def test_multi_objective_quick(tmp_path):
    out = tmp_path / "multi"
    rows = multi_objective.main(["--quick", "--out", str(out)])
    assert [r["setting"] for r in rows] == [s.name for s in multi_objective.SETTINGS]
    assert all(0 <= r["accuracy"] <= 1 and r["fid"] >= 0 and r["known_mse"] >= 0 for r in rows)
    inpainting = next(r for r in rows if r["setting"].startswith("inpainting only"))
    assert inpainting["known_mse"] < 0.01  # at weight 1 the known half is kept (about 1e-4 measured)
    table = out.with_suffix(".md").read_text()
    assert all(f"| {s.name} |" in table for s in multi_objective.SETTINGS)
    assert out.with_suffix(".png").stat().st_size > 0 and out.with_suffix(".json").exists()


@pytest.mark.slow
def test_steps_tradeoff_quick_resumes_point_by_point(tmp_path, capsys):
    out = str(tmp_path / "steps")
    narrow = steps_tradeoff.main(["--quick", "--samplers", "dpmpp_2m", "--calls", "5", "--out", out])
    assert {(r["sampler"], r["calls"]) for r in narrow} == {("dpmpp_2m", 5)} and len(narrow) == 3  # the bracketing scales
    rows = steps_tradeoff.main(["--quick", "--out", out])  # the whole quick plan: only the missing points are sampled
    assert rows[:3] == narrow
    assert {(r["sampler"], r["calls"]) for r in rows} == {("ddpm", 25), ("dpmpp_2m", 5), ("dpmpp_2m", 25)} and len(rows) == 5
    assert all(0 <= r["accuracy"] <= 1 and r["fid"] >= 0 for r in rows)
    assert "| ADM-G | dpmpp_2m | clip | 5 |" in (tmp_path / "steps.md").read_text()
    saved = json.loads((tmp_path / "steps.json").read_text())
    (tmp_path / "steps.json").write_text(json.dumps(dict(saved, flags=dict(saved["flags"], num_samples=20))))  # points of another size
    with pytest.raises(SystemExit):
        steps_tradeoff.main(["--quick", "--out", out])
    assert "holds points of 20 samples: use --num_samples 20 or another --out" in capsys.readouterr().err
