"""TRL's SFTTrainer trains a PrefixModel unchanged: chat data with assistant-only loss, packing, checkpointing."""

from __future__ import annotations

import pytest
import tiny
import torch

from prefixtune import PrefixModel, attach

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

# the tests' chat template with TRL's generation marks around the assistant's words and end-of-turn mark
TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}assistant : {% generation %}{{ m['content'] }} |"
    "{% endgeneration %} {% else %}{{ m['role'] }} : {{ m['content'] }} | {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)


def setup(seed: int = 0):
    tok = tiny.tokenizer("decoder", tiny.CHAT_WORDS + tiny.WORDS, chat_template=TEMPLATE)
    base = tiny.make("llama", vocab_size=len(tok), pad_token_id=0, eos_token_id=3, bos_token_id=2,
                     initializer_range=0.2)  # fmt: skip
    return attach(base, num_virtual_tokens=3, init="random", seed=seed), tok


def conversations(n: int = 16) -> datasets.Dataset:
    rows = [{"messages": [{"role": "user", "content": r["text"]}, {"role": "assistant", "content": r["target"]}]}
            for r in tiny.copy_rows(n)]  # fmt: skip
    return datasets.Dataset.from_list(rows)


def sft(model, tok, tmp_path, steps: int = 4, **options) -> trl.SFTTrainer:
    args = trl.SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=steps, per_device_train_batch_size=4,
                         learning_rate=5e-2, report_to=[], logging_steps=1, save_strategy="no", use_cpu=True,
                         assistant_only_loss=True, max_length=64, seed=0, bf16=False,  # fp32: comparable to a reload
                         **options)  # fmt: skip
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=conversations(), processing_class=tok)
    trainer.train()
    return trainer


@pytest.mark.parametrize("packing", [False, True])
def test_sft_trainer_trains_the_prefix_only_and_the_prefix_reloads(tmp_path, packing):
    model, tok = setup()
    base = {k: v.clone() for k, v in model.base_model.state_dict().items()}
    before = model.prefix.table.detach().clone()
    trainer = sft(model, tok, tmp_path, packing=packing)
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(model.prefix.table.detach(), before)
    assert all(torch.equal(v, model.base_model.state_dict()[k]) for k, v in base.items())  # the model stays frozen
    model.save_pretrained(tmp_path / "prefix")
    fresh, _ = setup(seed=7)
    loaded = PrefixModel.from_pretrained(fresh.base_model, tmp_path / "prefix")
    ids = tok(["good movie"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**ids).logits, model.eval()(**ids).logits, atol=1e-6, rtol=0)


def test_checkpointing_under_the_trainer_gives_the_same_training(tmp_path):
    """Trainer enables checkpointing through `activation_checkpointing_enable`; recomputation keeps the prefix."""
    tables = []
    for on in (False, True):
        model, tok = setup()
        sft(model, tok, tmp_path / str(on), steps=2, gradient_checkpointing=on)
        tables.append(model.prefix.table.detach().clone())
    torch.testing.assert_close(tables[0], tables[1], atol=1e-6, rtol=1e-5)


def test_a_packed_row_gives_each_document_what_it_gets_alone():
    """TRL's packing lays documents end to end with their bounds (`cu_seq_lens_q`): each sees the prefix, not the
    documents before it."""
    model, _ = setup()
    a, b = torch.randint(5, 30, (1, 5)), torch.randint(5, 30, (1, 4))
    bounds = torch.tensor([0, 5, 9])
    packing = {"position_ids": torch.cat([torch.arange(5), torch.arange(4)])[None], "cu_seq_lens_q": bounds,
               "cu_seq_lens_k": bounds, "max_length_q": 5, "max_length_k": 5}  # fmt: skip
    with torch.no_grad():
        packed = model(input_ids=torch.cat([a, b], 1), **packing).logits
        torch.testing.assert_close(packed[:, :5], model(input_ids=a).logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed[:, 5:], model(input_ids=b).logits, atol=1e-5, rtol=1e-5)
