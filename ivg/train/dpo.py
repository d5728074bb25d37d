"""DPO from the untuned model on pre-tokenized pairs (TRL); the tuned model is the implicit value's numerator."""

import dataclasses
import tempfile
from pathlib import Path
from typing import Callable

from ivg.config import ModelSpec
from ivg.models import load
from ivg.train.config import TrainSettings
from ivg.train.heads import lora_config, save_model


def train_dpo(untuned: ModelSpec, encoded: list[dict], out_dir, settings: TrainSettings,
              log: Callable[[str], None] = print) -> tuple[Path, dict]:
    """DPO from the untuned model on pre-tokenized pairs; saves a full HF folder (LoRA merged in)."""
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class PreTokenized(DPOTrainer):
        # Our rows already hold prompt_ids/chosen_ids/rejected_ids in the engine's tokenization; TRL's
        # own preparation would re-tokenize text and append EOS to every response.
        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset

    class Progress(TrainerCallback):  # one short line per step instead of the Trainer's metric dicts
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                log(f"  dpo step {state.global_step}/{state.max_steps} loss {logs['loss']:.4f} "
                    f"reward accuracy {logs.get('rewards/accuracies', float('nan')):.2f}")

    spec = dataclasses.replace(untuned, dtype="float32")  # train in float32 whatever it decodes in
    loaded = load(spec)
    # With LoRA the reference is the model with its adapter off; full fine-tuning needs a frozen copy.
    reference = None if settings.lora_r else load(spec).model
    with tempfile.TemporaryDirectory() as scratch:
        args = DPOConfig(
            output_dir=scratch, beta=settings.beta, learning_rate=settings.lr,
            num_train_epochs=settings.epochs, per_device_train_batch_size=settings.batch_size,
            seed=settings.seed, data_seed=settings.seed, max_length=None,
            bf16=False, gradient_checkpointing=False,  # TRL's defaults are for big models on GPUs
            use_cpu=loaded.device.type == "cpu", save_strategy="no", report_to="none",
            logging_steps=1, disable_tqdm=True, lr_scheduler_type="constant",
        )
        trainer = PreTokenized(loaded.model, ref_model=reference, args=args, train_dataset=Dataset.from_list(encoded),
                               processing_class=loaded.tokenizer,
                               peft_config=lora_config(settings) if settings.lora_r else None,
                               callbacks=[Progress()])
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    model = trainer.model.merge_and_unload() if settings.lora_r else trainer.model
    logs = [r for r in trainer.state.log_history if "loss" in r]
    stats = {"steps": trainer.state.global_step, "loss_first": logs[0]["loss"] if logs else None,
             "loss_last": logs[-1]["loss"] if logs else None}
    return save_model(model, loaded.tokenizer, out_dir), stats


