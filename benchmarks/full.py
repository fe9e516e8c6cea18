"""Wall time and peak memory of the smoke ``full`` run on smollm2-135m (target: <= 300 s, <= 3 GiB), and what the
side-effect metrics add to ``evaluate``'s time in the same run (``effects_seconds``; target: < 20% of the rest).

Runs ``python -m entrypoints.full`` in a child process against a fresh sqlite store and a fresh
outputs folder (the converted-model cache and the trained judge's cache, ``evaluation.judge_cache``, are
kept, as on any second run: ``judge_source`` says whether the judge was trained or read; ``--cold-judge``
gives the run a fresh judge cache, as on a machine's first run), and reads the child's
peak resident memory from ``getrusage(RUSAGE_CHILDREN)``. Per-stage times come from the runs, and
each variant's headline metrics (``HEADLINE``, with intervals and deltas) from its evaluate run, as do the
resident memory each of ``evaluate``'s steps peaked at (``evaluate_steps_peak_rss_gib``, ``core.profile``), which
place the run's peak in a step when ``evaluate`` holds it.

    python -m benchmarks.full [--data PATH] [--overrides "..."] [--profile] [--cold-judge]

Writes ``benchmarks/results/full.json``. With ``--profile`` the child runs under ``cProfile`` as well, and
``benchmarks/results/full_profile.json`` gets where the time went: per stage (from the runs), inside
``evaluate`` per step (the ``profile/<step>_seconds`` metrics of ``core.profile``: model loading, prefill,
decode, side effects, MC prompts and the rest of MC, each judge, statistics, MLflow logging) and the functions
with the most time of their own (cProfile's ``tottime``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pstats
import resource
import subprocess
import sys
import tempfile
import time

import mlflow

from benchmarks import DATA_CSV, PROJECT_DIR, RESULTS_DIR, write_report

RESULTS = RESULTS_DIR / "full.json"
PROFILE = RESULTS_DIR / "full_profile.json"
PROFILE_PREFIX = "profile/"
# Per-variant metrics recorded with the timing (with their intervals and deltas against baseline).
HEADLINE = ("mc1", "mc2", "semantic_acc", "semantic_diff", "llm_logprob_truthful", "judge_truthful",
            "judge_informative", "judge_truthful_informative", "steered_tokens_per_answer",
            "mc_steered_tokens_per_answer", "mean_new_tokens", "kl_neutral", "ce_neutral_delta", "ce_neutral",
            "kl_answers")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DATA_CSV))
    parser.add_argument("--overrides", default="")
    parser.add_argument("--profile", action="store_true", help="also run under cProfile and write full_profile.json")
    parser.add_argument("--cold-judge", action="store_true", help="a fresh trained-judge cache: train_judge trains")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        # create the store first, and keep the artifacts in the temporary folder (not ./mlruns)
        mlflow.MlflowClient(uri).create_experiment("truthsteer", artifact_location=f"file://{tmp}/mlruns")
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "TRUTHSTEER_OUTPUTS": f"{tmp}/outputs",
               "MLFLOW_DISABLE_TELEMETRY": "true"}
        if args.cold_judge:
            env["TRUTHSTEER_JUDGE_CACHE"] = f"{tmp}/judges"
        command = [sys.executable, "-m", "entrypoints.full", "--data", args.data, "--overrides", args.overrides]
        if args.profile:
            command[1:1] = ["-m", "cProfile", "-o", f"{tmp}/full.prof"]
        start = time.perf_counter()
        done = subprocess.run(command, cwd=PROJECT_DIR, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            sys.exit(f"full failed ({done.returncode}):\n{done.stderr[-4000:]}")
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        mlflow.set_tracking_uri(uri)
        runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                  filter_string="tags.`truthsteer.pipeline_stage` != ''")
        stages = {r.data.tags["truthsteer.pipeline_stage"]: (r.info.end_time - r.info.start_time) / 1000 for r in runs}
        variants = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                      filter_string="tags.`truthsteer.stage` = 'evaluate.variant'")
        metrics = {r.data.tags["truthsteer.variant"]: {k: round(v, 4) for k, v in sorted(r.data.metrics.items())
                                            if k.split("_ci_")[0].removesuffix("_delta") in HEADLINE or k in HEADLINE}
                   for r in variants}
        evaluate = next(r for r in runs if r.data.tags["truthsteer.pipeline_stage"] == "evaluate")
        effects = evaluate.data.metrics.get("effects_seconds", 0.0)
        evaluate_seconds = stages["evaluate"]
        judge_stages = {r.data.tags["truthsteer.pipeline_stage"]: {k: round(v, 4) for k, v in sorted(r.data.metrics.items())
                                                                   if not k.endswith(("_ci_low", "_ci_high"))}
                        for r in runs if r.data.tags["truthsteer.pipeline_stage"] in ("train_judge", "calibrate")}
        judge_source = next((r.data.tags.get("truthsteer.judge_source", "") for r in runs
                             if r.data.tags["truthsteer.pipeline_stage"] == "train_judge"), "no train_judge stage")
        steps = profile_steps(evaluate.data.metrics, "_seconds", 2)
        step_peaks = profile_steps(evaluate.data.metrics, "_peak_rss_gib", 3)
        hot = top_functions(f"{tmp}/full.prof") if args.profile else []
    result = {
        "command": " ".join(command[1:]),
        "wall_seconds": round(seconds, 1),
        "peak_rss_gib": round(peak_kib / 2**20, 3),
        "judge_source": judge_source,
        "stage_seconds": {k: round(v, 1) for k, v in sorted(stages.items(), key=lambda kv: kv[0])},
        # what the side-effect metrics (evaluation.side_effects) add to evaluate's time, in the same run
        "effects_seconds": round(effects, 1),
        "effects_share_of_the_rest_of_evaluate": round(effects / max(evaluate_seconds - effects, 1e-9), 3),
        # where evaluate's time went (core.profile's steps; nested: generate holds generate.*, judge.mc judge.mc.*)
        "evaluate_steps_seconds": steps,
        # the resident memory each of evaluate's steps peaked at (core.profile: sampled, and exact for the step
        # that raised the process's high-water mark), so the run's peak is placed in a step
        "evaluate_steps_peak_rss_gib": step_peaks,
        "targets": {"wall_seconds": 300, "peak_rss_gib": 3.0, "effects_share_of_the_rest_of_evaluate": 0.2},
        "variant_metrics": metrics,
        "judge_stages": judge_stages,
    }
    print(json.dumps(result, indent=2))
    write_report(RESULTS, result)
    if args.profile:
        # nested steps (generate.prefill in generate) are already in their parent's time
        accounted = sum(v for k, v in steps.items() if not any(k.startswith(f"{p}.") for p in steps))
        breakdown = {"wall_seconds": result["wall_seconds"], "stage_seconds": result["stage_seconds"],
                     "evaluate_seconds": round(evaluate_seconds, 1),
                     "evaluate_steps_seconds": steps, "evaluate_steps_peak_rss_gib": step_peaks,
                     "evaluate_unaccounted_seconds": round(evaluate_seconds - accounted, 1),
                     "top_functions_by_own_time": hot,
                     "note": "cProfile adds its own overhead to wall_seconds; the steps are nested: generate "
                             "holds generate.prefill and generate.decode, judge.mc holds judge.mc.prompts"}
        print(json.dumps({k: v for k, v in breakdown.items() if k != "top_functions_by_own_time"}, indent=2))
        write_report(PROFILE, breakdown)


def profile_steps(metrics: dict[str, float], suffix: str, digits: int) -> dict[str, float]:
    """``core.profile``'s ``profile/<step><suffix>`` metrics of a run, by step, rounded to ``digits``."""
    return {k.removeprefix(PROFILE_PREFIX).removesuffix(suffix): round(v, digits)
            for k, v in sorted(metrics.items()) if k.startswith(PROFILE_PREFIX) and k.endswith(suffix)}


def top_functions(path: str, n: int = 30) -> list[dict[str, object]]:
    """The ``n`` functions with the most time of their own in a cProfile dump, with their call counts."""
    stats = pstats.Stats(path, stream=io.StringIO())
    rows = []
    for (file, line, name), (_, calls, own, cumulative, _) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append({"function": f"{os.path.relpath(file) if file.startswith('/') else file}:{line}({name})",
                     "calls": calls, "own_seconds": round(own, 2), "cumulative_seconds": round(cumulative, 2)})
    return sorted(rows, key=lambda r: -float(r["own_seconds"]))[:n]  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
