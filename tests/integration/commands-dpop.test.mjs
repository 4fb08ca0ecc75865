// The command tests of commands.test.mjs again, with DPoP-bound tokens from the real
// authorization server (oidc-provider) at a cloud that checks DPoP strictly and asks for its
// own nonce (RFC 9449 4.3, 7.1, 9). See the top of commands.test.mjs.
process.env.IOTHUB_COMMANDS_AUTH = 'dpop';
await import('./commands.test.mjs');
