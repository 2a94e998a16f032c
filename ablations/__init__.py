"""Ablation language-model runs (docs/design.md section 8): data (:mod:`.data`), model (:mod:`.model`),
training and evaluation (:mod:`.train`), the grid runner behind ``mesa ablate`` (:mod:`.grid`) and
its report (:mod:`.report`)."""
