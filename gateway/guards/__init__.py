"""Guards for autonomous clients: settings enforced on a session, rate limits, the kill switch."""
