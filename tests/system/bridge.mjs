// One guest connection of QEMU's user networking (guestfwd=...-cmd:node bridge.mjs PORT): QEMU
// runs this per connection with the guest's stream on stdin/stdout; it joins that stream to
// 127.0.0.1:PORT on the host (the test's broker or cloud). A `tcp:` chardev instead would be a
// single connection opened when QEMU starts, not one per guest connection.
import net from 'node:net';

const port = Number(process.argv[2]);
if (!Number.isInteger(port) || port < 1 || port > 65535) process.exit(64);
const s = net.connect({ host: '127.0.0.1', port });
process.stdin.pipe(s);
s.pipe(process.stdout);
s.on('error', () => process.exit(1));
s.on('close', () => process.exit(0));
process.stdin.on('error', () => process.exit(0));
