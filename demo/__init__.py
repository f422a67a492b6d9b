"""The end-to-end demo (`python -m demo`) and the fixtures it shares with the tests and benchmarks: a tiny
random-weight Stable Diffusion (`demo.tiny_sd`), scikit-learn's handwritten digits as caption trees and image
folders (`demo.digits`), the demo's captions (captions.tsv), and running stage scripts as a user would
(`demo.stages`). The stage scripts themselves never import from here."""
