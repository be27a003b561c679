"""The demo: tiny locally built models, the template data set and its gold labeller."""
