"""The model parts a recipe names: norm layers (BN, CBN + SBN, NBN), losses, samplers, the decoupled
classifier stage and backbones (``ltbench.nn.backbones``). Each part is registered by name."""
