"""Sans-IO session core: the client's and the server's bytes in, what to do with them out;
the asyncio shell in gateway/proxy owns the sockets, timers and tasks that carry it out."""
