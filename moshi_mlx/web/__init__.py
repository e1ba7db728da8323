"""What the web server needs besides the conversation: which pages may use it."""
