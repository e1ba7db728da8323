"""The browser app: the server (`server`: routes, the page, shutdown), the chat websocket (`chat`:
who holds the model, one connection's session), Kyutai's protocol (`protocol`), which pages may
connect (`origin`) and the page itself (`static/`). `moshi_mlx.local_web` is its command."""
