"""Tuning methods, each trained for many users at once by one loop.

registry.py        every method by name (served ones, evaluation-only ones, what each stores)
base.py            the loop's inputs and outputs, and the protocol a method implements
loop.py            the one training loop (shared passes, per-user losses, early stopping, DPO)
train.py           train_adapters: a job's users with the method its config names
prefix.py          prefix tuning on decoders; prefix_training.py its training (and length search)
seq2seq.py         prefix tuning on encoder-decoders (a prefix for the encoder and the decoder)
lora.py            a LoRA per user; pt_peft.py a prefix stage, then a LoRA; auto.py the best of each
memory.py          the memory prefix (the model's KV of a user's most typical texts)
preservation.py    the KL-to-base term; preference.py preference pairs and DPO's loss
prompt_tuning.py   soft input tokens; peft_lora.py PEFT's LoRA (baselines the evaluation trains)
artifacts.py       the stored form of a trained adaptation (safetensors)
"""
