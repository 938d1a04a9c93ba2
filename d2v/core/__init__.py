"""The bottom layer: errors, configuration and presets, the Batch type, devices, the tokenizer, CPU threads."""
