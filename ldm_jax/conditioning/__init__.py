"""Conditioning for cross-attention LDMs: tokenizers and the encoders tau_theta that map tokens
[B, L] int32 to a context [B, L, width] float32 for the UNet's cross-attention.

* tokenizers.py: text tokenizers (BERT WordPiece, CLIP BPE) returning padded int32 token arrays.
* ldm_bert.py:   the paper's text encoder (CompVis BERTEmbedder / diffusers LDMBertModel),
                 trained jointly with the UNet; also the attention/norm pieces the others share.
* clip_text.py:  a frozen CLIP text transformer (Stable Diffusion 1.x/2.x ``text_encoder``).
* hf_bert.py:    a frozen transformers ``BertModel`` (e.g. MiniLM) as a text encoder.
"""
