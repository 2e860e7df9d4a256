"""jobs/bench_twig_lm.py on a tiny text-only Llama: the engine's greedy decoding and SSD work on a
*ForCausalLM, SSD's output equals greedy's, and train_twig's labelling and loop run on chat text."""

import math

import torch

from evaluation.bench_twig_lm import (
    TextProcessor,
    compare,
    engine_inputs,
    greedy_decode,
    greedy_replies,
    prompt_batch,
    restrict_to_replies,
)
from operators.twig import grow_twig
from tests.tiny_models import tiny_llama
from training.train_twig import IGNORE, Conversation, TwigTrainConfig, encode, train_twig

PROMPTS = ["what shape is the red circle ?", "describe the picture .", "where is the blue square ?", "is there a cat ?"]


def test_greedy_on_a_causal_lm_equals_hugging_face_generate():
    model, tokenizer = tiny_llama(seed=1)
    ids, mask = prompt_batch(tokenizer, PROMPTS[:3])
    ours = greedy_decode(model, engine_inputs(model, ids, mask), 10, tokenizer.eos_token_id, tokenizer.pad_token_id)
    theirs = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False)[:, ids.shape[1] :]
    for row in range(3):
        n = int(ours.lengths[row])
        assert ours.tokens[row, :n].tolist() == theirs[row, :n].tolist()


def test_ssd_equals_greedy_on_a_causal_lm_at_batch_1_and_3():
    model, tokenizer = tiny_llama(seed=2, num_hidden_layers=6)
    twig = grow_twig(model, K=2, T=1)
    with torch.no_grad():  # a twig that agrees with the base only sometimes
        for p in twig.layers.parameters():
            p.add_(0.05 * torch.randn_like(p))
    rows = compare(model, twig, tokenizer, PROMPTS, [1, 3], max_new_tokens=16, label="noisy")
    assert [r["batch"] for r in rows] == [1, 3]
    assert all(r["identical"] for r in rows)
    assert all(r["generated"] > len(PROMPTS) and 0.0 <= r["acceptance"] <= 1.0 for r in rows)


def test_chat_text_is_labelled_on_the_reply_and_the_twig_trains():
    model, tokenizer = tiny_llama(seed=3)
    processor = TextProcessor(tokenizer)
    replies = greedy_replies(model, tokenizer, PROMPTS, max_new_tokens=8, batch=2)
    conversations = [Conversation(f"c{n}", [(p, r)]) for n, (p, r) in enumerate(zip(PROMPTS, replies, strict=True))]
    encoded = encode(processor, Conversation("x", [("what shape is the red circle ?", "a red circle")]))
    labelled = encoded.labels[encoded.labels != IGNORE].tolist()
    assert tokenizer.decode(labelled) == "a red circle </s>"
    twig = grow_twig(model, K=1, T=1)
    before = [p.detach().clone() for p in twig.parameters()]
    result = train_twig(
        model,
        processor,
        twig,
        conversations,
        TwigTrainConfig(K=1, T=1, steps=2, batch_size=2, warmup=1),
        log=lambda _: None,
    )
    assert math.isfinite(result["final_loss"]) and result["answer_tokens"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, twig.parameters(), strict=True))


def test_a_draft_vocabulary_from_the_base_replies_keeps_ssd_identical():
    """--draft-vocab: the head keeps the replies' most frequent tokens (EOS too); SSD is still greedy."""
    model, tokenizer = tiny_llama(seed=2, num_hidden_layers=6)
    processor = TextProcessor(tokenizer)
    replies = greedy_replies(model, tokenizer, PROMPTS, max_new_tokens=8, batch=4)
    conversations = [Conversation(f"c{n}", [(p, r)]) for n, (p, r) in enumerate(zip(PROMPTS, replies, strict=True))]
    twig = grow_twig(model, K=2, T=4)  # the rest of the base: drafts fail only off the vocabulary
    report = restrict_to_replies(twig, processor, conversations, 6)
    assert report["size"] == 6 == twig.head.out_features and 0 < report["coverage"] <= 1
    assert tokenizer.eos_token_id in twig.draft_vocab.tolist()
    rows = compare(model, twig, tokenizer, PROMPTS, [1, 3], max_new_tokens=12, label="small vocab")
    assert all(r["identical"] for r in rows)
