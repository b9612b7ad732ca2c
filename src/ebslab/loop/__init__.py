"""Layer 2, the loop: the Trainer, its callbacks, backends, evaluation, checkpoints, the noise scale, tracking, optimizers. Imports core and inputs. See ARCHITECTURE.md."""
