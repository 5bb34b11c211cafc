"""The frozen base model and what every layer above uses: model loading (`model`), prompts and
training rows (`prompts`, `data`), sampling, precision, a prefix's and a LoRA's place in the forward
pass (`prefix`, `lora`), the batch KV cache and mixed-batch generation. Imports nothing of Steer's
but `core.errors`: tuning methods (core/tuners/), serving (core/inference/) and the service sit above.
"""
