//! ip-chat (in progress).
