"""The HTTPS control API: the server side (`api`) and the tunnel's client (`client`)."""
