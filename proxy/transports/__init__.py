"""The doors agents and operators come in by: the gRPC servers and servicers, the MCP door (Streamable HTTP, and the
stdio bridge), authentication, load shedding, listeners, answers cut to the message limit."""
