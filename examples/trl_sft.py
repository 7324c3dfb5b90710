"""A prefix trained by TRL's SFTTrainer, unchanged: BBC headlines as conversations on SmolLM2-135M-Instruct.

The model is a `PrefixModel`; SFTTrainer trains it like any model (its fused LM head, gradient
checkpointing and packing included). The data are TRL's conversational prompt/completion records, so
the loss is on the completion only with any chat template; with a template that marks assistant turns
(`{% generation %}`), `messages` records and `assistant_only_loss=True` work the same way
(tests/test_trl.py). The prefix is saved in prefixtune's format and reloaded with
`PrefixModel.from_pretrained`.

    python examples/trl_sft.py                  # SmolLM2, 60 steps
    TRL_MODEL=path TRL_STEPS=4 python examples/trl_sft.py
"""

from __future__ import annotations

import os

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from prefixtune import PrefixModel, attach
from prefixtune.assets import load_builtin_dataset, smollm2_path

MODEL = os.environ.get("TRL_MODEL") or smollm2_path()
STEPS = int(os.environ.get("TRL_STEPS", "60"))
OUT = "trl-headline-prefix"


def prompt_completion(rows: list[dict]) -> Dataset:
    """`bbc_headline_chat` conversations as TRL prompt/completion records: the user turn, then the headline."""
    return Dataset.from_list([{"prompt": r["messages"][:1], "completion": r["messages"][1:]} for r in rows])


def main() -> None:
    data = load_builtin_dataset("bbc_headline_chat")
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = attach(AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32), num_virtual_tokens=16)
    model.print_trainable_parameters()
    args = SFTConfig(output_dir=f"{OUT}-trainer", max_steps=STEPS, per_device_train_batch_size=8, learning_rate=1e-2,
                     max_length=192, logging_steps=10, save_strategy="no", report_to=[], use_cpu=True,
                     bf16=False)  # fmt: skip
    trainer = SFTTrainer(model=model, args=args, train_dataset=prompt_completion(data["train"][: 8 * STEPS]),
                         processing_class=tokenizer)  # fmt: skip
    trainer.train()
    model.save_pretrained(OUT)  # prefixtune's tiny folder: the prefix, not the frozen model

    base = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    reloaded = PrefixModel.from_pretrained(base, OUT).eval()
    ask = data["test"][0]["messages"][:1]
    ids = tokenizer.apply_chat_template(ask, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = reloaded.generate(**ids, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    print("headline:", tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip())
    print("real    :", data["test"][0]["messages"][1]["content"])


if __name__ == "__main__":
    main()
