"""Small user-style models for the tests (issue 14, item 8): each module's build(num_classes) is a
`--model user_models.<module>:build` factory, built the way a user's own nn.Module is.

None is shaped like the built-in models (no image_encoder, text_encoder, fusion or head): a GRU, a
PyTorch TransformerEncoder with cross-attention, a residual depthwise CNN with gated fusion, and an
ids-only model with a bilinear product. All take 32x32 images and 16 MiniLM token ids.
"""
