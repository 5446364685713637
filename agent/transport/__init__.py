"""MQTT transport: the topic scheme, message schemas, the session, and block transfer."""
