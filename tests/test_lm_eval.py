"""lm-evaluation-harness drives `lmforge serve` unchanged: multiple-choice, rolling
log-likelihood and generate-until tasks from local task files (nothing downloaded), with
lm-eval's remote tokenizer (the server's /tokenizer_info, /tokenize, /detokenize); the scores
equal lm-eval's own `hf` model on the same weights exported to a Hugging Face folder."""

import json

import pytest

from .test_real_models import smollm2  # noqa: F401  (fixture)
from .test_serve import RunningServer, checkpoint  # noqa: F401  (fixture)

QUESTIONS = [("ROMEO: I love", [" her", " zzz", " qqq"], 0), ("KING: My lord,", [" I", " xx", " 9"], 0),
             ("To be or not to", [" be", " ww", " #"], 0), ("JULIET: O Romeo,", [" Romeo", " vvv", " @@"], 0)]  # fmt: skip
TEXTS = ["First Citizen:\nBefore we proceed any further, hear me speak.",
         "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?"]  # fmt: skip


def write_tasks(folder):
    """Three local tasks, one per kind of request lm-eval makes."""
    data = folder / "data"
    data.mkdir()
    with open(data / "mc.jsonl", "w") as f:
        for question, choices, gold in QUESTIONS:
            f.write(json.dumps({"question": question, "choices": choices, "gold": gold}) + "\n")
    with open(data / "text.jsonl", "w") as f:
        for text in TEXTS:
            f.write(json.dumps({"text": text}) + "\n")
    common = "dataset_path: json\ntest_split: train\n"
    (folder / "mc.yaml").write_text(
        f"task: lmforge_mc\n{common}dataset_kwargs:\n  data_files: {data / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{gold}}'\ntarget_delimiter: ''\nmetric_list:\n  - metric: acc\n"
    )
    (folder / "rolling.yaml").write_text(
        f"task: lmforge_rolling\n{common}dataset_kwargs:\n  data_files: {data / 'text.jsonl'}\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n"
    )
    (folder / "gen.yaml").write_text(
        f"task: lmforge_gen\n{common}dataset_kwargs:\n  data_files: {data / 'mc.jsonl'}\n"
        "output_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{choices[0]}}'\n"
        "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 8\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")  # fmt: skip
    with open(data / "long.jsonl", "w") as f:  # longer than the tiny model's 128-token context
        f.write(json.dumps({"text": " ".join(TEXTS * 4)}) + "\n")
    (folder / "long.yaml").write_text(
        f"task: lmforge_long\n{common}dataset_kwargs:\n  data_files: {data / 'long.jsonl'}\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n"
    )
    return ["lmforge_mc", "lmforge_rolling", "lmforge_gen"]


def compare(served: dict, reference: dict, tasks: list[str]) -> None:
    compared = set()
    for task in tasks:
        ours, theirs = served["results"][task], reference["results"][task]
        for metric, value in theirs.items():
            if metric.endswith(",none") and "stderr" not in metric:
                assert ours[metric] == pytest.approx(value, rel=1e-4, abs=1e-4), (task, metric)
                compared.add(metric)
    assert {"acc,none", "word_perplexity,none", "bits_per_byte,none", "exact_match,none"} <= compared


def evaluate(model: str, model_args: str, tasks: list[str], folder) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    results = simple_evaluate(model=model, model_args=model_args, tasks=tasks,
                              task_manager=TaskManager(include_path=str(folder)), log_samples=True)  # fmt: skip
    return results


@pytest.fixture
def offline_datasets(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_lm_eval_through_the_server_equals_lm_eval_on_the_exported_model(
    checkpoint, tmp_path, offline_datasets
):  # noqa: F811
    from lmforge.chat import chat_template_of
    from lmforge.checkpoint import load_checkpoint, open_checkpoint
    from lmforge.interop.hf import export_hf
    from lmforge.serving.server import ServerSettings, create_app

    tasks = write_tasks(tmp_path)
    model, tokenizer, config = load_checkpoint(checkpoint)
    server = RunningServer(
        create_app(model, tokenizer, ServerSettings(model_name="tiny"), chat_template_of(checkpoint))
    )
    try:
        served = evaluate("local-completions", f"base_url={server.url}/v1/completions,tokenizer_backend=remote",
                          [*tasks, "lmforge_long"], tmp_path)  # fmt: skip
    finally:
        server.stop()
    opened = open_checkpoint(checkpoint)
    export_hf(model, tokenizer, config, tmp_path / "hf-model", opened.chat_template, opened.generation.eos_token_ids,
              opened.generation.sampling)  # fmt: skip
    reference = evaluate(
        "hf", f"pretrained={tmp_path / 'hf-model'},dtype=float32,device=cpu", tasks, tmp_path
    )
    compare(served, reference, tasks)
    # Per item: the log-likelihoods lm-eval got from the server are the hf model's.
    for ours, theirs in zip(served["samples"]["lmforge_mc"], reference["samples"]["lmforge_mc"], strict=True):
        for a, b in zip(ours["resps"], theirs["resps"], strict=True):
            assert a[0][0] == pytest.approx(b[0][0], abs=1e-3)
    # A text longer than the context (lm-eval sends it whole, as it does not know the context):
    # the server scores it in sliding windows instead of refusing it.
    from lmforge.evaluation.perplexity import evaluate_ids

    sample = served["samples"]["lmforge_long"][0]
    ids = [tokenizer.eot_id, *tokenizer.encode(sample["doc"]["text"])]  # lm-eval's rolling prefix token first
    assert len(ids) > 128
    expected = evaluate_ids(model, tokenizer, ids, context=128, stride=64)  # as `lmforge eval` scores it
    assert sample["resps"][0][0] == pytest.approx(-expected.loss * (len(ids) - 1), rel=1e-4)


def test_lm_eval_on_smollm2_through_the_server_equals_lm_eval_hf(smollm2, tmp_path, offline_datasets):  # noqa: F811
    from lmforge.checkpoint import open_checkpoint
    from lmforge.serving.server import ServerSettings, create_app

    gguf = smollm2
    tasks = write_tasks(tmp_path)
    checkpoint = open_checkpoint(gguf)
    model, tokenizer = checkpoint.load()
    server = RunningServer(create_app(model.eval(), checkpoint.tokenizer(), ServerSettings(model_name="smollm2"),
                                      checkpoint.chat_template))  # fmt: skip
    try:
        served = evaluate("local-completions", f"base_url={server.url}/v1/completions,tokenizer_backend=remote",
                          tasks, tmp_path)  # fmt: skip
    finally:
        server.stop()
    reference = evaluate("hf", f"pretrained={gguf.parent},gguf_file={gguf.name},dtype=float32,device=cpu", tasks,
                         tmp_path)  # fmt: skip
    compare(served, reference, tasks)
    assert served["results"]["lmforge_mc"]["acc,none"] >= 0.75  # a real model knows these
