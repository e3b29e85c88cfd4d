"""The networks of the paper's experiments: Figure 1's MLP and Figure 5's BN-Inception."""
