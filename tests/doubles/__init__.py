"""Test doubles: fake vendor libraries (torch.ops namespaces, modules) with reference semantics."""
