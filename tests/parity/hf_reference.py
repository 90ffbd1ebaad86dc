#!/usr/bin/env python3
"""Reference outputs of transformers' BertForPreTraining for the parity tests.

    python3 tests/parity/hf_reference.py OUT_DIR

Writes OUT_DIR/model (a random BertForPreTraining with an odd config, saved by save_pretrained),
OUT_DIR/batch.json (a padded batch with MLM and NSP labels) and OUT_DIR/reference.safetensors: the outputs
(last_hidden_state, pooler_output, prediction_logits, seq_relationship_logits), the losses, and the
gradient of the loss for every parameter as grad.<name>, in eval mode (no dropout), float32.
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import BertConfig, BertForPreTraining


def main():
    out = sys.argv[1]
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=37,
        hidden_size=20,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=36,
        max_position_embeddings=24,
        type_vocab_size=2,
        hidden_act="gelu",
        initializer_range=0.2,
    )
    model = BertForPreTraining(config)
    # LayerNorm parameters away from 1/0 so their gradients are exercised.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.add_(0.1 * torch.randn_like(p))
            if name.endswith("bias"):
                p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(os.path.join(out, "model"))
    model = BertForPreTraining.from_pretrained(os.path.join(out, "model"), attn_implementation="eager").eval()

    lengths = [9, 6, 4]
    t = max(lengths)
    g = torch.Generator().manual_seed(1)
    input_ids = torch.zeros(3, t, dtype=torch.long)
    token_type_ids = torch.zeros(3, t, dtype=torch.long)
    attention_mask = torch.zeros(3, t, dtype=torch.long)
    labels = torch.full((3, t), -100, dtype=torch.long)
    for i, n in enumerate(lengths):
        input_ids[i, :n] = torch.randint(1, 37, (n,), generator=g)
        token_type_ids[i, n // 2 : n] = 1
        attention_mask[i, :n] = 1
        for j in range(1, n - 1, 2):
            labels[i, j] = int(torch.randint(0, 37, (1,), generator=g))
    nsp = torch.tensor([0, 1, 1])
    batch = {
        "input_ids": input_ids.tolist(),
        "token_type_ids": token_type_ids.tolist(),
        "attention_mask": attention_mask.tolist(),
        "labels": labels.tolist(),
        "next_sentence_label": nsp.tolist(),
    }
    with open(os.path.join(out, "batch.json"), "w") as f:
        json.dump(batch, f)

    o = model(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask,
              labels=labels, next_sentence_label=nsp, output_hidden_states=True)
    o.loss.backward()
    v = config.vocab_size
    mlm = torch.nn.functional.cross_entropy(o.prediction_logits.view(-1, v), labels.view(-1))
    nsp_loss = torch.nn.functional.cross_entropy(o.seq_relationship_logits.view(-1, 2), nsp.view(-1))
    tensors = {
        "last_hidden_state": o.hidden_states[-1].detach(),
        "pooler_output": model.bert.pooler(o.hidden_states[-1]).detach(),
        "prediction_logits": o.prediction_logits.detach(),
        "seq_relationship_logits": o.seq_relationship_logits.detach(),
        "loss": torch.stack([o.loss.detach(), mlm.detach(), nsp_loss.detach()]),
    }
    for name, p in model.named_parameters():
        tensors["grad." + name] = p.grad.detach().clone()
    save_file({k: v.contiguous().float() for k, v in tensors.items()}, os.path.join(out, "reference.safetensors"))


if __name__ == "__main__":
    main()
