"""01 - The Llama-3.1 forward pass, one step at a time, checked against the model's own forward.

A small Llama-3.1-shaped model (random weights, llama3 RoPE scaling, grouped-query attention) runs a sequence
twice: once as model(ids), once by hand with the library's small pure functions (rms_norm, rope_cos_sin,
apply_rope, attend). The two must agree: that is everything a decoder layer does.

Run: .venv/bin/python examples/01_llama_forward.py     (a second; no download)
"""
import torch
import torch.nn.functional as F

from mplus import Llama, LlamaConfig, RopeScaling
from mplus.llama.layers import attend, rms_norm
from mplus.llama.rope import apply_rope, inv_freq_for, rope_cos_sin

config = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=8, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5,
                     rope_theta=500000.0, rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 64),
                     max_position_embeddings=1024, tie_word_embeddings=False, bos_token_id=1, eos_token_id=(2,))
model = Llama(config)
g = torch.Generator().manual_seed(0)
with torch.no_grad():
    for p in model.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * 0.1 if p.dim() > 1 else torch.ones(p.shape))
ids = torch.tensor([[1, 17, 42, 7, 99, 3]])  # [B=1, T=6]
T, H, H_kv, D = ids.shape[1], config.num_attention_heads, config.num_key_value_heads, config.head_dim
print(f"config: d={config.hidden_size}, {H} query heads sharing {H_kv} key/value heads (GQA group {H // H_kv}), "
      f"head_dim {D}, RoPE llama3 scaling")

with torch.no_grad():
    x = model.model.embed_tokens(ids)  # [1, T, d]
    print(f"embed_tokens          {tuple(x.shape)}")
    cos, sin = rope_cos_sin(inv_freq_for(config), torch.arange(T))  # [T, D] each
    print(f"RoPE tables cos/sin   {tuple(cos.shape)}  (inverse frequencies after llama3 scaling: "
          f"{inv_freq_for(config)[:2].tolist()} ...)")
    for l, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        h = rms_norm(x, layer.input_layernorm.weight, config.rms_norm_eps)  # [1, T, d]
        q = apply_rope(attn.q_proj(h).view(1, T, H, D).transpose(1, 2), cos, sin)  # [1, H, T, D]
        k = apply_rope(attn.k_proj(h).view(1, T, H_kv, D).transpose(1, 2), cos, sin)  # [1, H_kv, T, D]
        v = attn.v_proj(h).view(1, T, H_kv, D).transpose(1, 2)  # [1, H_kv, T, D]
        a = attend(q, k, v)  # [1, H, T, D]: causal softmax(q k^T / sqrt(D)) v, head h reads kv head h // 4
        x = x + attn.o_proj(a.transpose(1, 2).reshape(1, T, H * D))  # residual
        h = rms_norm(x, layer.post_attention_layernorm.weight, config.rms_norm_eps)
        x = x + mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h))  # SwiGLU, residual
        print(f"layer {l}: q {tuple(q.shape)} k/v {tuple(k.shape)} -> attention {tuple(a.shape)} -> x {tuple(x.shape)}")
    logits = model.lm_head(rms_norm(x, model.model.norm.weight, config.rms_norm_eps))  # [1, T, V]
    reference = model(ids)
diff = (logits - reference).abs().max().item()
print(f"logits {tuple(logits.shape)}; by hand vs model(ids): max |diff| = {diff:.2e}")
assert diff < 1e-5, "the hand-written steps disagree with the model"
print("next token after the sequence (greedy):", int(logits[0, -1].argmax()))
