"""ui/: the Gradio web app. Chat page for everyone, admin page behind a password."""
