"""The three loops of docs/own_loop.md, not written for thimble, at tiny sizes: each example script records its
run (a Hugging Face Trainer on a Llama in bf16 with warm-up, weight decay 0.1 and clipping 1.0; a Lightning module
in bf16-true; a plain loop on a CNN with LayerNorm, float32 under bf16 autocast), and the workflow analyses the
three recordings as the config's ``own_loops`` experiments: the replay matches bit for bit, and every stage, the
report and the series run. (That the recorded bits are the tensors each loop held, copied inside the loop, is
tests/test_integrations.py's and tests/test_recorder.py's.)"""

import json
import subprocess
import sys

import h5py
import pytest
from conftest import REPO, offline_config, run_snakemake

#: each example's command line at a tiny size (the data folder is the mini dataset's)
EXAMPLES = {
    "llama_hf": ["hf_llama.py", "--steps", "12", "--hidden", "16", "--seq-len", "16", "--batch", "4", "--warmup", "4"],
    "lightning_lm": ["lightning_lm.py", "--steps", "10", "--width", "16", "--seq-len", "16", "--batch", "4"],
    "cnn_autocast": ["plain_autocast.py", "--steps", "12", "--batch", "8"],
}


@pytest.mark.workflow
def test_loops_not_written_for_thimble_are_recorded_replayed_and_analysed(mini_data, tmp_path):
    data = mini_data / "results/data/shakespeare_mini"
    for name, (script, *options) in EXAMPLES.items():
        command = [sys.executable, str(REPO / "examples" / script), str(tmp_path / "runs" / name), *options]
        if script != "plain_autocast.py":
            command += ["--data", str(data)]
        result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
        assert result.returncode == 0, f"{script}: {result.stderr[-3000:]}"

    config = offline_config()
    for name in list(config["experiments"]):
        if "source" in config["experiments"][name] and name not in EXAMPLES:
            del config["experiments"][name]
    for name in EXAMPLES:
        config["experiments"][name]["source"]["recording"] = str(tmp_path / "runs" / name)
        config["experiments"][name]["analysis"] = {"trend_window_steps": 4}
    config["series"] = {"own_loops": list(EXAMPLES)}
    (tmp_path / "config.yaml").write_text(json.dumps(config))
    run_snakemake(tmp_path, "--cores", "2", "results/series/own_loops/verdicts.csv",
                  *(f"results/{name}/summary.html" for name in EXAMPLES))

    for name in EXAMPLES:
        results = tmp_path / "results" / name
        with h5py.File(tmp_path / "runs" / name / "stream" / "stream.h5") as handle:
            recorded = json.loads(handle.attrs["param_names"])
            optimizer = str(handle.attrs["optimizer_class"])
        replay = json.loads((results / "replay.json").read_text())
        assert replay["replayed"] and replay["bitwise_match"], (name, replay["total_mismatches"])
        assert replay["optimizer"] == optimizer == "torch.optim.adamw.AdamW"
        assert list(replay["tensors"]) == recorded and replay["weight_decay"]["applies"]
        summary = json.loads((results / "summary.json").read_text())
        assert sorted(summary["tensors"]) == sorted(recorded)  # the grouped tensor first, then the model's order
        assert (results / "summary.html").stat().st_size > 0
    # the question tensor of each: the embedding its token groups were given for, else the first recorded
    assert json.loads((tmp_path / "results/llama_hf/summary.json").read_text())["question_tensor"] == \
        "model.embed_tokens.weight"
    assert json.loads((tmp_path / "results/cnn_autocast/summary.json").read_text())["question_tensor"] == \
        "conv.weight"
    verdicts = (tmp_path / "results/series/own_loops/verdicts.csv").read_text().splitlines()
    assert {line.split(",")[0] for line in verdicts[1:]} == set(EXAMPLES)
