//! Signed tokens for tests: HS256, RS256 and ES256 keys generated in the test, and tokens
//! minted with them (also deliberately broken ones).
