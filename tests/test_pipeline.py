"""The real CLI, end to end, on the real embedded model and real WikiText-2 (reduced sizes)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, data_dir

REDUCED = ["calib.nsamples=4", "calib.seqlen=128", "eval.seqlen=128", "eval.max_windows=2",
           "progress=false", "launcher=local"]


def _reloaded_ppl(model_dir: Path, plain: bool) -> float:
    """WikiText-2 perplexity of an exported checkpoint on REDUCED's windows (2 x 128, test),
    loaded by plain transformers or by `spikellm.load_quantized`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spikellm import evaluation_set, perplexity
    from spikellm.export import load_quantized
    if plain:
        model, tok = AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)
    else:
        lm = load_quantized(model_dir)
        model, tok = lm.model, lm.tokenizer
    windows = evaluation_set(tok, "wikitext2", 128, 2, split="test", data_dir=str(data_dir()))
    return perplexity(model, windows, batch_size=4)


def _point_runs(runs: list[dict]) -> dict:
    """quant.wbits -> the W&B point run of that sweep point."""
    return {r["config"]["quant.wbits"]: r for r in runs if r["run"]["job_type"] == "point"}


def _manifest(p) -> dict:
    return json.loads(Path(p.stdout.strip().splitlines()[-1].split("results: ")[-1]).read_text())


def _run(args, tmp_path, env_extra=None):
    env = dict(os.environ, SPIKELLM_DATA_DIR=str(data_dir()), **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "pipelines.run", f"paths.outputs={tmp_path}", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("override,key", [("quant.wbits=0", "quant.wbits"),
                                          ("spiking.ratio=1.5", "spiking.ratio"),
                                          ("model=unknown_model", "model=unknown_model")])
def test_bad_override_exits_nonzero_with_one_line(override, key, tmp_path):
    p = _run([override], tmp_path)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0] and lines[0].startswith("error:")
    assert not any(tmp_path.iterdir())                      # nothing started


@pytest.mark.parametrize("args,needle", [
    (["~calib.seed"], "deleting a key is not supported"),
    (["~logger"], "set logger=none"),
    (["-m", "quant.wbits=interval(2,4)"], "interval() needs a sampling sweeper"),
    (["hydra/launcher=submitit_slurm"], "use launcher=slurm"),
    (["hydra.launcher.partition=gpu"], "launcher.partition="),
    (["hydra.job.chdir=true"], "results go under paths.outputs"),
    (["-m", "hydra.run.dir=/tmp/x", "quant.wbits=3,4"], "with -m set hydra.sweep.dir"),
    (["hydra.sweep.dir=/tmp/x"], "for a single run set hydra.run.dir"),
])
def test_hydra_habits_not_honoured_are_one_line_errors(args, needle, tmp_path):
    """Accepted-and-ignored was the bug: each of these is refused before any work."""
    p = _run(args, tmp_path)
    assert p.returncode == 2, p.stderr[-2000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], lines
    assert not any(tmp_path.iterdir())


def test_hydra_flags_print_help_and_configs_as_hydra_does(tmp_path):
    h = _run(["--help"], tmp_path)
    assert h.returncode == 0 and "quant " in h.stdout and "omniquant" in h.stdout and "--cfg" in h.stdout
    job = _run(["--cfg", "job", "--package", "quant", "quant.wbits=3"], tmp_path)
    assert job.returncode == 0 and "wbits: 3" in job.stdout and "method: gptq" in job.stdout
    hyd = _run(["-c", "hydra", "--package", "hydra.sweeper"], tmp_path)
    assert hyd.returncode == 0 and "BasicSweeper" in hyd.stdout
    everything = _run(["--cfg", "all"], tmp_path)
    assert everything.returncode == 0 and "hydra:" in everything.stdout and "spiking:" in everything.stdout
    # --resolve: interpolations resolved (paths.outputs, point i's hydra.job.num / sweep subdir);
    # one that needs the run (hydra.runtime.output_dir) stays as written
    res = _run(["--cfg", "all", "--resolve", "-m", "quant.wbits=2,3"], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "${" not in res.stdout.split("hydra:")[0] and "subdir: 1" in res.stdout
    assert "filename: ${hydra.runtime.output_dir}" in res.stdout
    info = _run(["--info", "quant=rtn"], tmp_path)
    assert info.returncode == 0, info.stderr[-2000:]
    for section in ("Config search path", "provider=main", "Defaults", "Plugins", "Config"):
        assert section in info.stdout
    assert f"quant: rtn -> {ROOT / 'conf' / 'quant' / 'rtn.yaml'}" in info.stdout
    only = _run(["--info", "defaults"], tmp_path)
    assert "Defaults" in only.stdout and "Config search path" not in only.stdout
    bad = _run(["--bogus"], tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: --bogus is not an option")
    assert not list(tmp_path.rglob("manifest.json"))


def test_shell_completion_installs_and_completes_in_real_bash(tmp_path):
    script = _run(["-sc", "install=bash"], tmp_path)
    assert script.returncode == 0 and "complete -o nospace" in script.stdout
    (tmp_path / "c.sh").write_text(script.stdout)

    def reply(line):
        cmd = (f'source {tmp_path / "c.sh"}; COMP_LINE="{line}"; COMP_POINT=${{#COMP_LINE}}; '
               f'_spikellm_pipelines_run; printf "%s\\n" "${{COMPREPLY[@]}}"')
        return subprocess.run(["bash", "-c", cmd], cwd=ROOT, capture_output=True, text=True,
                              timeout=120).stdout.split()
    assert reply("python -m pipelines.run quant=omniquant spiking=t") == ["spiking=t2", "spiking=t4", "spiking=ternary"]
    assert "quant.let_lr=" in reply("python -m pipelines.run quant=omniquant quant.l")
    assert "quant.let_lr=" not in reply("python -m pipelines.run quant=gptq quant.l")   # the chosen method's keys
    assert reply("python -m pipelines.run --con") == ["--config-dir"]
    fish = _run(["-sc", "install=fish"], tmp_path)
    assert fish.returncode == 2 and "fish is not supported" in fish.stderr


def test_config_dir_and_searchpath_add_a_users_own_model(tmp_path):
    """A user's model/mymodel.yaml outside the repo, through --config-dir and through
    hydra.searchpath, runs as model=mymodel (a real reduced run)."""
    user = tmp_path / "my_conf"
    (user / "model").mkdir(parents=True)
    src = (ROOT / "conf" / "model" / "smollm2_135m.yaml").read_text()
    (user / "model" / "mymodel.yaml").write_text(src.replace("name: smollm2_135m", "name: mymodel"))
    out = tmp_path / "out"
    p = _run(["-cd", str(user), "model=mymodel", "quant=rtn", "spiking=none", "logger=none",
              *REDUCED], out)
    assert p.returncode == 0, p.stderr[-2000:]
    m = _manifest(p)
    assert m["choices"]["model"] == "mymodel" and m["config"]["model"]["name"] == "mymodel"
    sp = _run([f"hydra.searchpath=[file://{user}]", "model=mymodel", "--info", "defaults"], out)
    assert sp.returncode == 0 and f"model: mymodel -> {user / 'model' / 'mymodel.yaml'}" in sp.stdout
    missing = _run(["model=mymodel"], out)
    assert missing.returncode == 2 and "add your own with --config-dir DIR" in missing.stderr
    nodir = _run(["-cd", str(tmp_path / "nope"), "model=mymodel"], out)
    assert nodir.returncode == 2 and "is not a directory" in nodir.stderr.strip().splitlines()[0]


def test_slurm_only_settings_on_a_local_run_are_refused(tmp_path):
    """launcher=local cannot honour a partition or job memory: one line, nothing run."""
    p = _run([*REDUCED, "launcher.partition=gpu", "launcher.cpu_jobs.mem_gb=16"], tmp_path)
    assert p.returncode == 2
    line = p.stderr.strip().splitlines()
    assert len(line) == 1 and "launcher.partition=gpu, launcher.cpu_jobs.mem_gb=16 only apply to SLURM jobs" in line[0]
    assert not list(tmp_path.rglob("manifest.json"))


def test_launcher_slurm_without_a_controller_is_one_line_error(tmp_path):
    # a SLURM_CONF that names no file: squeue cannot reach a controller (as on a laptop)
    p = _run(REDUCED[:-1] + ["launcher=slurm"], tmp_path, {"SLURM_CONF": str(tmp_path / "none.conf")})
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    # (squeue ... when SLURM's tools are installed, "sbatch and squeue not on PATH" when not)
    assert len(lines) == 1 and "launcher=slurm but no SLURM controller answers (" in lines[0]
    assert "launcher=local" in lines[0]


def test_missing_data_dir_is_one_line_error(tmp_path):
    p = _run(REDUCED + [f"paths.data_dir={tmp_path / 'nodata'}"], tmp_path / "out")
    assert p.returncode == 2
    err = p.stderr.strip().splitlines()[-1]
    assert err.startswith("error:") and "wiki.valid.raw" in err and "nodata" in err


def test_default_pipeline_end_to_end_reduced(tmp_path):
    from pipelines.wandb_offline import find_runs, read_run
    p = _run(REDUCED + ["eval.tasks=[winogrande,boolq]", "eval.limit=6"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    manifest_path = Path(p.stdout.strip().splitlines()[-1].split("results: ")[-1])
    m = json.loads(manifest_path.read_text())
    metrics = m["metrics"]
    for key in ("ppl/wikitext2", "ppl/fp/wikitext2", "cost/avg_steps", "cost/ace",
                "time/quantize_s", "mem/peak_gb"):
        assert key in metrics and metrics[key] == metrics[key]      # present, not NaN
    assert metrics["ppl/wikitext2"] > metrics["ppl/fp/wikitext2"] > 1
    assert abs(metrics["cost/avg_steps"] - 1.4) < 0.01
    assert m["config"]["spiking"]["mode"] == "ternary" and m["choices"]["quant"] == "gptq"
    assert m["calibration"]["windows"] == [4, 128]
    stats = json.loads((manifest_path.parent / "module_stats.json").read_text())
    assert len(stats) == 30 * 7 and all(r["loss"] >= 0 for r in stats)
    assert "ppl/wikitext2" in p.stdout and "results:" in p.stdout
    # energy per token from the layer costs: ternary spike steps are additions (1.4 steps on
    # average), the layers' non-additive share multiplies
    energy, a = m["energy"], metrics["cost/additive_fraction"]
    assert len(energy["layers"]) == 30 * 7 and "ASSUMED constants" in p.stdout and a > 0.9
    assert metrics["cost/energy_rel_fp16"] == pytest.approx(1.4 * (a * 0.9 + (1 - a) * 4.6) / 4.6, rel=0.02)
    # zero-shot through lm-eval in both evaluate stages, averaged, and logged as a W&B table
    for tag in ("", "fp/"):
        accs = [metrics[f"acc/{tag}{t}"] for t in ("winogrande", "boolq")]
        assert all(a in {i / 6 for i in range(7)} for a in accs)
        assert metrics[f"acc/{tag}avg"] == pytest.approx(sum(accs) / 2)
        assert metrics[f"n/{tag}winogrande"] == 6
    runs = [read_run(f) for f in find_runs(tmp_path)]
    ev = next(r for r in runs if r["run"]["job_type"] == "evaluate")
    assert ev["summary"]["acc/avg"] == metrics["acc/avg"]
    logged = {k: v for h in ev["history"] for k, v in h.items()}
    assert logged["zero_shot/_type"] == "table-file" and logged["zero_shot/nrows"] == 3   # 2 tasks + avg
    # every stage is a committed artifact, logged as one offline W&B run
    for stage in ("calibrate", "evaluate_fp", "quantize", "evaluate"):
        assert len([p for p in (tmp_path / "cache" / stage).iterdir() if not p.name.startswith(".")]) == 1
    # save_model=true on the cached run: only the export stage runs, the checkpoint lands in the
    # new run's directory, and loading it (weight-only: plain transformers too) reproduces the
    # reported perplexity
    p = _run(REDUCED + ["eval.tasks=[winogrande,boolq]", "eval.limit=6", "save_model=true"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    m2 = _manifest(p)
    assert m2["metrics"]["ppl/wikitext2"] == metrics["ppl/wikitext2"] and m2["metrics"]["export/gb"] > 0.1
    model_dir = Path(m2["model_dir"])
    assert model_dir.parent != manifest_path.parent and (model_dir.parent / "manifest.json").exists()
    for plain in (True, False):
        assert _reloaded_ppl(model_dir, plain) == pytest.approx(metrics["ppl/wikitext2"], rel=1e-6)


@pytest.mark.slow
def test_packed_export_of_the_embedded_model_is_storage_bits_large_and_reloads_exactly(tmp_path):
    """save_format=packed through the CLI on the real embedded model (RTN W3 g64 keeps it short;
    every quantizer's packing: test_packing; both pipelines on tiny models: test_export): the
    linears as codes in bits + FP16 scales, as large as cost/storage_bits says (within 5%),
    reloading to exactly the reported perplexity; a plain load fails loudly."""
    from transformers import AutoModelForCausalLM
    p = _run(REDUCED + ["quant=rtn", "quant.wbits=3", "quant.group_size=64", "spiking=none",
                        "eval.fp_baseline=false", "save_model=true", "save_format=packed"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    m3 = _manifest(p)["metrics"]
    assert m3["export/packed_layers"] == 30 * 7
    assert m3["export/packed_bits"] == pytest.approx(m3["cost/storage_bits"], rel=0.05)
    model_dir = Path(_manifest(p)["model_dir"])
    # the file on disk over SmolLM2-135M's 30 x 3,538,944 linear weights
    on_disk = (model_dir / "packed.safetensors").stat().st_size * 8 / (30 * 3_538_944)
    assert on_disk == pytest.approx(m3["cost/storage_bits"], rel=0.05) and 3.5 <= on_disk < 3.6   # 3 + 2 x 16/64
    assert _reloaded_ppl(model_dir, plain=False) == m3["ppl/wikitext2"]
    with pytest.raises(ValueError, match="spikellm"):
        AutoModelForCausalLM.from_pretrained(model_dir)
    # a packed export needs the codes recorded while quantizing: without save_model, one line
    p = _run(REDUCED + ["save_format=packed"], tmp_path)
    assert p.returncode != 0 and "save_model=true" in p.stderr.strip().splitlines()[-1]


def test_sweep_runs_shared_stages_once_logs_wandb_and_reruns_nothing(tmp_path):
    from pipelines.wandb_offline import find_runs, read_run
    # RTN keeps this fast; the shared-score path is covered by test_dag and test_slurm
    sweep = REDUCED + ["-m", "quant=rtn", "spiking=none", "quant.wbits=3,4"]
    # Hydra's hydra.sweep.dir is the sweep record, point n's run directory <dir>/<n>
    sweep_dir = tmp_path / "my_sweep"
    p = _run(sweep + [f"hydra.sweep.dir={sweep_dir}"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (sweep_dir / "plan.json").exists() and not list((tmp_path / "sweeps").glob("*/*/plan.json"))
    runs_here = {json.loads((sweep_dir / str(n) / "manifest.json").read_text())["config"]["quant"]["wbits"]
                 for n in (0, 1)}
    assert runs_here == {3, 4} and not list((tmp_path / "runs").glob("*/*/manifest.json"))
    assert all("hydra" not in json.loads((sweep_dir / str(n) / "manifest.json").read_text())["name"]
               for n in (0, 1))
    # the report: the swept key as the table's column and the plot's x axis, a matplotlib PNG
    page = (sweep_dir / "report.html").read_text()
    assert "<th>quant.wbits</th>" in page and "<th>point</th>" not in page
    png = sweep_dir / "plot_ppl_wikitext2.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "src='plot_ppl_wikitext2.png'" in page
    again = _run(sweep + [f"hydra.sweep.dir={sweep_dir}"], tmp_path)   # never mixed with a new sweep
    assert again.returncode == 2 and "already holds a sweep record" in again.stderr
    states = [json.loads(f.read_text()) for f in (sweep_dir / "state").glob("*.json")]
    executed = sorted(s["stage"] for s in states if s["state"] == "done")
    assert executed == ["calibrate", "evaluate", "evaluate", "evaluate_fp", "quantize", "quantize"]
    runs = [read_run(f) for f in find_runs(sweep_dir / "wandb")]
    stage_runs = [r for r in runs if r["run"]["job_type"] != "point"]
    assert sorted(r["run"]["job_type"] for r in stage_runs) == executed
    date = json.loads((sweep_dir / "plan.json").read_text())["created"][:10]
    assert {r["run"]["group"] for r in runs} == {f"sweep-{date}-{sweep_dir.name}"}
    ev = [r for r in runs if r["run"]["job_type"] == "evaluate"]
    assert all(r["summary"]["ppl/wikitext2"] > 1 for r in ev)
    assert {r["config"]["quant"]["wbits"] for r in ev} == {3, 4}
    assert all(r["exit_code"] == 0 for r in runs)
    # stage runs are named by what they serve: the swept value, or "shared by" for shared ones
    names = sorted(r["run"]["name"] for r in stage_runs)
    assert names == ["calibrate (shared by 2 points)", "evaluate quant.wbits=3", "evaluate quant.wbits=4",
                     "evaluate_fp (shared by 2 points)", "quantize quant.wbits=3", "quantize quant.wbits=4"]
    assert all(set(r["run"]["tags"]) == {"smollm2_135m", "rtn", "none"} for r in runs)
    # one run per point with its whole result: ppl, the FP baseline and cost together, the
    # swept key as a top-level config column
    pts = _point_runs(runs)
    assert sorted(pts) == [3, 4]
    for w, r in pts.items():
        assert r["run"]["name"] == f"quant.wbits={w}"
        m = json.loads((sweep_dir / str([3, 4].index(w)) / "manifest.json").read_text())["metrics"]
        for k in ("ppl/wikitext2", "ppl/fp/wikitext2", "cost/ace", "cost/storage_bits", "cost/energy_rel_fp16"):
            assert r["summary"][k] == m[k]
    assert "sweep:" in p.stdout
    # the same sweep again: every stage cached, nothing executed, no W&B run; launcher=auto
    # says where it runs (a SLURM_CONF naming no file: no controller answers)
    p2 = _run([a for a in sweep if a != "launcher=local"] + ["launcher=auto"], tmp_path,
              {"SLURM_CONF": str(tmp_path / "none.conf")})
    assert p2.returncode == 0, p2.stderr[-3000:]
    assert "launcher=auto chose local, in this process: no SLURM (" in p2.stderr
    sweep2 = sorted((tmp_path / "sweeps").glob("*/*"))[-1]
    assert sweep2 != sweep_dir
    states2 = [json.loads(f.read_text())["state"] for f in (sweep2 / "state").glob("*.json")]
    assert set(states2) == {"cached"} and len(states2) == 6
    # no stage run (nothing executed), but the point runs carry the cached results
    runs2 = [read_run(f) for f in find_runs(sweep2)]
    assert all(r["run"]["job_type"] == "point" for r in runs2)
    pts2 = _point_runs(runs2)
    assert sorted(pts2) == [3, 4]
    assert all(pts2[w]["summary"]["ppl/wikitext2"] == pts[w]["summary"]["ppl/wikitext2"] for w in (3, 4))
    st = subprocess.run([sys.executable, "-m", "pipelines.status", str(sweep2)], cwd=ROOT,
                        capture_output=True, text=True)
    assert st.returncode == 0 and "total: 6 cached" in st.stdout


def test_omniquant_spiking_w4a4_end_to_end_with_baseline_in_one_sweep(tmp_path):
    """`-m spiking=none,t2`: the OmniQuant baseline and SpikeLLM W4A4 in one code path."""
    args = REDUCED + ["-m", "quant=omniquant", "quant.wbits=4", "quant.abits=4", "quant.epochs=1",
                      "spiking=none,t2", "logger=none", "eval.fp_baseline=false"]
    p = _run(args, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    manifests = sorted((tmp_path / "runs").glob("*/*/manifest.json"))
    assert len(manifests) == 2
    by_mode = {}
    for f in manifests:
        m = json.loads(f.read_text())
        by_mode[m["config"]["spiking"]["mode"]] = m["metrics"]
    for mode, metrics in by_mode.items():
        assert metrics["ppl/wikitext2"] > 1 and metrics["time/block_epoch_s"] > 0
    assert by_mode["none"]["cost/avg_steps"] == pytest.approx(1.0)
    assert by_mode["gif"]["cost/avg_steps"] == pytest.approx(1.1, abs=0.01)
    assert by_mode["gif"]["cost/ace_rel_baseline"] == pytest.approx(1.1, abs=0.01)
    assert by_mode["gif"]["ppl/wikitext2"] != by_mode["none"]["ppl/wikitext2"]
    # one calibration set and one pass of activation statistics shared by both points
    for stage in ("calibrate", "act_stats"):
        assert len([d for d in (tmp_path / "cache" / stage).iterdir() if not d.name.startswith(".")]) == 1
    # streamed from the checkpoint's shards (one block in memory), evaluated from the quantized
    # checkpoint it writes (masks included): the same model, so the same perplexity
    # and evaluated either whole from that checkpoint or itself block by block (eval.stream)
    p = _run([a for a in args if a != "spiking=none,t2"] + ["spiking=t2", "model.stream=true",
                                                            "eval.stream=false,true"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    streamed = {m["config"]["eval"]["stream"]: m["metrics"] for m in
                (json.loads(f.read_text()) for f in (tmp_path / "runs").glob("*/*/manifest.json"))
                if m["config"]["model"]["stream"]}
    assert set(streamed) == {False, True}
    assert streamed[False]["ppl/wikitext2"] == by_mode["gif"]["ppl/wikitext2"]
    assert streamed[True]["ppl/wikitext2"] == pytest.approx(by_mode["gif"]["ppl/wikitext2"], rel=1e-6)
    assert streamed[True]["cost/ace"] == by_mode["gif"]["cost/ace"]
    # save_model=true, whole and streamed quantize (both cached: only the export runs): the
    # checkpoint in the run directory reloads through spikellm.load_quantized to the reported
    # perplexity, and a plain transformers load (which would drop the activation and KV
    # quantizers) fails loudly instead of computing another model
    from transformers import AutoModelForCausalLM
    for extra in ([f"hydra.run.dir={tmp_path / 'w4a4_run'}"], ["model.stream=true"]):
        p = _run([a for a in args if a not in ("spiking=none,t2", "-m")] + ["spiking=t2", "save_model=true", *extra],
                 tmp_path)
        assert p.returncode == 0, p.stderr[-3000:]
        m = _manifest(p)
        if "model.stream=true" not in extra:          # Hydra's hydra.run.dir is the run directory
            assert Path(m["model_dir"]) == tmp_path / "w4a4_run" / "model"
        assert _reloaded_ppl(Path(m["model_dir"]), plain=False) == pytest.approx(
            by_mode["gif"]["ppl/wikitext2"], rel=1e-6)
        with pytest.raises(ValueError, match="spikellm"):
            AutoModelForCausalLM.from_pretrained(m["model_dir"])


#: recipes that name a 7B-70B checkpoint and splits that exist only on a cluster (WikiText-2
#: train): composed and planned for every option in tests/test_configs.py, not run here
CLUSTER_RECIPES = "paper_*,omni_own_w*"


@pytest.mark.slow
def test_every_cpu_recipe_runs_as_one_glob_sweep_at_tiny_sizes(src, tmp_path):
    """`-m experiment=glob(*)` (less the cluster recipes): every point of every recipe runs to a
    manifest with finite perplexities, on the real embedded model cut to 6 blocks."""
    tiny = [f"model.path={src}", "calib.nsamples=2", "calib.seqlen=64", "eval.seqlen=64",
            "eval.max_windows=1", "progress=false", "launcher=local"]
    p = _run(["-m", f"experiment=glob(*,exclude=[{CLUSTER_RECIPES}])", *tiny], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    recipes = sorted(f.stem for f in (ROOT / "conf" / "experiment").glob("*.yaml")
                     if not any(f.match(f"{g}.yaml") for g in CLUSTER_RECIPES.split(",")))
    manifests = [json.loads(f.read_text()) for f in (tmp_path / "runs").glob("*/*/manifest.json")]
    ran = {m["choices"]["experiment"] for m in manifests}
    assert ran == set(recipes)
    for m in manifests:
        ppl = {k: v for k, v in m["metrics"].items() if k.startswith("ppl/")}
        assert ppl and all(1 < v < float("inf") for v in ppl.values()), (m["choices"], ppl)
