"""The simulator harness of the demo: gym-pusht, its scripted experts, the recording of the demo dataset and the
closed-loop rollout of a checkpoint. It imports the core packages (ki_data, ki_model); they never import it."""
