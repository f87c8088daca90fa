"""A random-weight Llama with SmolLM2-135M's shapes and tokenizer, for a smoke run of the recipe."""
import sys
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

out, here = sys.argv[1], sys.argv[2]
layers = int(sys.argv[3]) if len(sys.argv) > 3 else 30
d = int(sys.argv[4]) if len(sys.argv) > 4 else 576
cfg = LlamaConfig.from_pretrained(here)
cfg.num_hidden_layers, cfg.hidden_size = layers, d
cfg.intermediate_size = d * 8 // 3
cfg.head_dim = d // cfg.num_attention_heads
torch.manual_seed(0)
model = LlamaForCausalLM(cfg)
model.save_pretrained(out)
AutoTokenizer.from_pretrained(here).save_pretrained(out)
print("smoke model", sum(p.numel() for p in model.parameters()) / 1e6, "M params ->", out)
