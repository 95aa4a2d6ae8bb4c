"""What researchers look at: the paper's Table 2 from interpretability results (`compare`), the static neuron
viewer (`viewer`), and the results-table helpers both use (`tables`). They read the tables `crate.interp`
writes (schemas in `crate.interp.schema`) and never define their own."""
