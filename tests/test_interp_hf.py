"""The in-process Hugging Face backend with a tiny randomly initialised GPT-2 and a byte-level BPE tokenizer, both
built here and loaded back from a local directory (nothing is downloaded)."""

import numpy as np
import pytest
import torch

from crate.interp.backends import BackendError, build_backend
from crate.interp.config import BackendConfig
from crate.interp.prompts import VALUE_STRINGS, explanation_prompt, render_text, simulation_prompt
from crate.interp.protocols import metric_groups
from crate.interp.records import Excerpt, FeatureRecords
from crate.interp.scoring import score_task

WORDS = [" the", " cat", " sat", " on", " mat", " dog", " ran"]


def records() -> FeatureRecords:
    rng = np.random.default_rng(0)

    def excerpt(ref):
        tokens = tuple(WORDS[i] for i in rng.integers(0, len(WORDS), 10))
        return Excerpt(ref, tokens, np.array([4.0 if t == " cat" else 0.0 for t in tokens], dtype=np.float32))

    return FeatureRecords(0, 1, top=[excerpt(f"top/{i}") for i in range(10)],
                          random=[excerpt(f"random/{i}") for i in range(10)], top_focus=[0] * 10)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    r = records()
    corpus = [render_text(explanation_prompt(r.top[:5])), *(simulation_prompt("cat", e.tokens)[0] for e in r.top)]
    corpus += ["".join(f"{w}\t{v}\n" for w in WORDS for v in VALUE_STRINGS)] * 20
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=400, min_frequency=2, special_tokens=["<|endoftext|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=4096, n_embd=32, n_layer=2, n_head=2,
                                       bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id))
    cat = tokenizer(" cat")["input_ids"][0]
    with torch.no_grad():  # make every position predict " cat": greedy explanations read "cat cat cat ..."
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(model.transformer.wte.weight[cat] * 50)
    path = tmp_path_factory.mktemp("tiny-lm")
    tokenizer.save_pretrained(path)
    model.save_pretrained(path)
    return path


def config(model_dir, **overrides) -> BackendConfig:
    """The full reading and crate-v1 prompts unless a test asks for the protocols' (see test_top_k_reading...)."""
    return BackendConfig(**{"kind": "hf", "explainer_model": str(model_dir), "device": "cpu", "temperature": 0.0,
                            "max_explanation_tokens": 8, "reading": "full", "prompt_format": "crate-v1", **overrides})


def test_simulated_values_are_expected_values_read_right_after_each_tab(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    backend = build_backend(config(model_dir))
    excerpts = records().top[:3]
    simulation = backend.simulator.simulate("cat", excerpts)
    assert simulation.n_defaulted == 0 and [len(v) for v in simulation.values] == [10, 10, 10]
    tokenizer, model = AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir)
    text, offsets = simulation_prompt("cat", excerpts[1].tokens)
    encoded = tokenizer(text, return_offsets_mapping=True, return_tensors="pt")
    starts = [s for s, _ in encoded.pop("offset_mapping")[0].tolist()]
    with torch.no_grad():
        probs = torch.softmax(model(**encoded).logits[0], dim=-1)
    value_ids = [tokenizer(f"x\t{v}")["input_ids"][-1] for v in VALUE_STRINGS]
    for offset, simulated in zip(offsets, simulation.values[1]):
        p = probs[starts.index(offset) - 1, value_ids].double().numpy()
        assert simulated == pytest.approx(float(p @ np.arange(11) / p.sum()), rel=1e-4)


@pytest.mark.parametrize("k", [5, 15])
def test_top_k_reading_is_the_forks_digits_among_the_k_best_logits(model_dir, k):
    """mimic_api_simulation: torch.topk(logits, k), each id decoded alone, digits renormalised, none -> 0."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    backend = build_backend(config(model_dir, reading=f"top-{k}", prompt_format="fork"))
    excerpts = records().top[:2]
    simulation = backend.simulator.simulate("cat", excerpts)
    tokenizer, model = AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir)
    text, offsets = simulation_prompt("cat", excerpts[1].tokens, "fork")
    encoded = tokenizer(text, return_offsets_mapping=True, return_tensors="pt")
    starts = [s for s, _ in encoded.pop("offset_mapping")[0].tolist()]
    with torch.no_grad():
        logits = model(**encoded).logits[0]
    none_in_top = 0
    for offset, simulated in zip(offsets, simulation.values[1]):
        best = torch.topk(logits[starts.index(offset) - 1], k)
        top = {tokenizer.decode([int(i)]): float(v) for i, v in zip(best.indices, best.values)}
        digits = {int(t): np.exp(v) for t, v in top.items() if t in VALUE_STRINGS}
        none_in_top += not digits
        expected = sum(d * p for d, p in digits.items()) / sum(digits.values()) if digits else 0.0
        assert simulated == pytest.approx(expected, rel=1e-4, abs=1e-9)
    assert simulation.n_defaulted >= none_in_top


def test_hf_backend_explains_and_scores_a_feature(model_dir):
    backend = build_backend(config(model_dir))
    (group, metrics), = metric_groups("crate-paper", ["tar", "random"], "rescore")
    rows = score_task(group.task(records()), metrics, backend, seed=0)
    assert rows[0]["explanation"].startswith("cat") and rows[0]["status"] in ("scored", "undefined")
    assert rows[0]["backend"] == f"hf:{model_dir.name}" and rows[0]["simulator_kind"] == "logprob-ev"
    assert rows[0]["attempts"] == 3  # one generate, two batched forward passes over 10 excerpts
    assert score_task(group.task(records()), metrics, backend, seed=0)[0]["explanation"] == rows[0]["explanation"]


def test_hf_backend_refuses_what_it_cannot_run(model_dir, tmp_path):
    with pytest.raises(BackendError, match="no local model directory"):
        build_backend(config(tmp_path / "missing"))
    with pytest.raises(BackendError, match="needs CUDA"):
        build_backend(config(model_dir, load_in_4bit=True))


def test_one_call_in_flight_per_hf_model_and_explanations_reproducible_per_seed(model_dir):
    from concurrent.futures import ThreadPoolExecutor

    from crate.interp.config import InterpConfig

    hf = InterpConfig(checkpoint="x.pt", backend=config(model_dir))
    assert hf.workers.concurrency == 1  # one HF model answers one call at a time unless the user asks for more
    assert InterpConfig(checkpoint="x.pt").workers.concurrency == 4
    backend = build_backend(config(model_dir, temperature=1.0, max_explanation_tokens=8))
    excerpts = records().top[:5]
    alone = {seed: backend.explainer.explain(excerpts, seed) for seed in range(6)}
    assert len(set(alone.values())) > 1  # sampled: the seed matters
    with ThreadPoolExecutor(6) as threads:  # the user asked for concurrency: same answers per seed
        for _ in range(2):
            together = dict(zip(range(6), threads.map(lambda seed: backend.explainer.explain(excerpts, seed), range(6))))
            assert together == alone
