"""The code example of a short article on prefix tuning (a Transformers `Trainer` script for sentiment
classification), made to run and made into real prefix tuning.

Changes from the article (each marked "article:" below):
- the missing imports of TrainingArguments and Trainer are added;
- bert-base-uncased / GLUE SST-2 need the hub, so the bundled MiniLM encoder and the bundled Rotten
  Tomatoes snippets (research use; Pang & Lee, the source corpus of SST-2) stand in for them;
- ONE added line wraps the model: `model = prefixtune.attach(...)`. The article glued a fixed text
  to every input and fine-tuned all of BERT; here that text initialises a learned prefix and
  the encoder stays frozen;
- a prefix needs a far larger learning rate than full fine-tuning (1e-2 instead of 2e-5);
- it trains for a bounded number of steps so it finishes in a couple of minutes on a laptop CPU.

Run:  python examples/article_trainer.py  (set ARTICLE_MODEL=<folder> and ARTICLE_STEPS=<n> to shrink it).
"""

import os

from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,  # article: was never imported
    TrainingArguments,  # article: was never imported
)

import prefixtune
from prefixtune.assets import load_builtin_dataset, minilm_path

# Load the pretrained model and tokenizer (article: "bert-base-uncased", which needs the hub)
model_name = os.environ.get("ARTICLE_MODEL") or minilm_path()
model = AutoModelForSequenceClassification.from_pretrained(model_name, num_labels=2)
tokenizer = AutoTokenizer.from_pretrained(model_name)

# Load the data (article: load_dataset("glue", "sst2"), whose text column is "sentence", not "text")
dataset = load_builtin_dataset("rotten_tomatoes")
steps = int(os.environ.get("ARTICLE_STEPS", "150"))

# The prefix (article: glued to every input text; now it only initialises the learned prefix)
prefix = "This is a positive sentiment sentence."


def preprocess_function(examples):
    # article: the text is no longer glued in front; the prefix lives inside the model
    return tokenizer(examples["text"], truncation=True, max_length=64)


def encode(rows):
    encoded = preprocess_function({"text": [r["text"] for r in rows]})
    return [{**{k: v[i] for k, v in encoded.items()}, "labels": r["label"]} for i, r in enumerate(rows)]


encoded_dataset = {"train": encode(dataset["train"][: steps * 16]), "validation": encode(dataset["validation"])}

model = prefixtune.attach(model, tokenizer=tokenizer, text=prefix, num_virtual_tokens=16)  # the one added line
model.print_trainable_parameters()

training_args = TrainingArguments(
    output_dir="./results",
    learning_rate=1e-2,  # article: 2e-5 suits full fine-tuning, not a prefix
    per_device_train_batch_size=16,
    num_train_epochs=3,
    max_steps=steps,  # article: bounded so the example finishes in minutes on a CPU
    save_strategy="no",
    report_to=[],
    logging_steps=max(1, steps // 10),
)

trainer = Trainer(
    model=model,
    args=training_args,
    train_dataset=encoded_dataset["train"],
    eval_dataset=encoded_dataset["validation"],
    data_collator=DataCollatorWithPadding(tokenizer),
)
trainer.train()
print(trainer.evaluate())

# Save the tuned prefix: a few hundred KB, never the base model
model.save_pretrained("./results")
