"""The user's document's continued-pretraining script (Unsloth's notebook), line for line; only the
import lines are cpt's. As in the notebook, it loads Llama-3-8B in 4-bit (a CUDA GPU) and 10% of
FineWeb-Edu sample-10BT from the Hub. tests/test_compat.py runs this file with a tiny model and a local
JSON file in place of the two names.

    python examples/seed.py
"""
from datasets import load_dataset

from cpt.compat import FastLanguageModel, UnslothTrainer, UnslothTrainingArguments, is_bfloat16_supported

max_seq_length = 2048  # the notebook's settings, which the document's code uses
dtype = None  # None for auto detection
load_in_4bit = True

#I load a pre-quantized version of Llama 3, llama-3-8b-bnb-4bit. You can also load the standard version. The only difference is that llama-3-8b-bnb-4bit is faster to download
model, tokenizer = FastLanguageModel.from_pretrained(
    model_name = "unsloth/llama-3-8b-bnb-4bit",
    max_seq_length = max_seq_length,
    dtype = dtype,
    load_in_4bit = load_in_4bit,
)


model = FastLanguageModel.get_peft_model(
    model,
    r = 128,
    target_modules = ["q_proj", "k_proj", "v_proj", "o_proj",
                      "gate_proj", "up_proj", "down_proj",
                      "embed_tokens", "lm_head",], # Add for continual pretraining
    lora_alpha = 32,
    lora_dropout = 0, # Supports any, but = 0 is optimized
    bias = "none",    # Supports any, but = "none" is optimized
    use_gradient_checkpointing = "unsloth", # True or "unsloth" for very long context
    random_state = 3407,
    use_rslora = True,
)


dataset = load_dataset("HuggingFaceFW/fineweb-edu", "sample-10BT", split = "train[:10%]",)

trainer = UnslothTrainer(
    model = model,
    tokenizer = tokenizer,
    train_dataset = dataset,
    dataset_text_field = "text",
    max_seq_length = max_seq_length,
    dataset_num_proc = 8,

    args = UnslothTrainingArguments(
        per_device_train_batch_size = 2,
        gradient_accumulation_steps = 8,
        warmup_ratio = 0.1,
        max_steps = 2000,

        # Select a 2 to 10x smaller learning rate for the embedding matrices!
        learning_rate = 5e-6,
        embedding_learning_rate = 1e-6,

        fp16 = not is_bfloat16_supported(),
        bf16 = is_bfloat16_supported(),
        logging_steps = 10,
        save_steps = 100,
        save_total_limit = 10,
        optim = "adamw_8bit",
        weight_decay = 0.00,
        lr_scheduler_type = "cosine",
        seed = 3407,
        output_dir = "./Llama-3-8B-fineweb-edu-r128a32wd0lstcosinelr5e06-10BT",
    ),
)

trainer_stats = trainer.train()
