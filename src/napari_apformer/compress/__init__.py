"""Multi-dimensional joint search compression (issue 15; docs/compression.md).

From trained weights: learnable L1 importance factors on the dimensions a family declares
searchable are trained together with the weights for one run (`search`), units are kept by a
global threshold per dimension at a budget (`budget`), and a physically smaller network with
the factors folded into its weights is built and saved with its card (`pipeline`), optionally
fine-tuned. `command` holds `apformer compress`.

Family-neutral: this package uses the family interface (`model.base`) and the capability in
`capability.JointSearch`; a family's own slicing stays in `model/<family>/`.
"""
