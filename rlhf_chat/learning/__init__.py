"""Learning: votes to preference pairs, the reward model, PPO (its math apart), the one supervised term, checkpoints and the background loop."""
