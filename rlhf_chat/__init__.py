"""rlhf-chat: a chatbot that learns live from people's pairwise votes."""
