// A TCP proxy on 127.0.0.1 that network faults are made with (issue 12): it forwards bytes
// untouched to a target it can switch at run time, and on request cuts every open connection,
// or cuts answers half-way (forwards half of the first chunk the server sends after the client
// sent a request body, then resets both sides), or refuses new connections. It records the
// first byte each client sent, so that a test can tell a TLS ClientHello (0x16) from plain
// text (an MQTT CONNECT is 0x10): a client that "falls back" to plain text shows up.
import net from 'node:net';
import { once } from 'node:events';

export class CutProxy {
  constructor(target) {
    this.target = target; // { host, port }
    this.conns = new Set();
    this.stats = { connections: 0, cuts: 0, answerCuts: 0, refused: 0, firstBytes: [] };
    this.cutAnswersLeft = 0;
    this.requestBytes = 1500; // client bytes after which the server's next chunk is an "answer"
    this.refusing = false;
    this.holding = false; // server -> client bytes are kept back (holdAnswers())
    this.held = [];       // [{ client, data }] in the order the server sent them
  }

  static async start(target) {
    const p = new CutProxy(target);
    p.server = net.createServer((c) => p.#onConn(c));
    p.server.listen(0, '127.0.0.1');
    await once(p.server, 'listening');
    p.port = p.server.address().port;
    return p;
  }

  #onConn(client) {
    this.stats.connections++;
    if (this.refusing) { this.stats.refused++; client.resetAndDestroy(); return; }
    const upstream = net.connect(this.target.port, this.target.host);
    const conn = { client, upstream, fromClient: 0, first: true };
    this.conns.add(conn);
    const end = () => { this.conns.delete(conn); client.destroy(); upstream.destroy(); };
    client.on('data', (d) => {
      if (conn.first) { this.stats.firstBytes.push(d[0]); conn.first = false; }
      conn.fromClient += d.length;
      upstream.write(d);
    });
    upstream.on('data', (d) => {
      if (this.cutAnswersLeft > 0 && conn.fromClient > this.requestBytes && d.length > 1) {
        this.cutAnswersLeft--;
        this.stats.answerCuts++;
        client.write(d.subarray(0, d.length >> 1), () => { client.resetAndDestroy(); upstream.destroy(); });
        this.conns.delete(conn);
        return;
      }
      if (this.holding) { this.held.push({ client, data: d }); return; }
      client.write(d);
    });
    client.on('error', end);
    upstream.on('error', end);
    client.on('close', end);
    upstream.on('close', end);
  }

  // Resets every open connection (a NAT or Wi-Fi drop, a broker's socket torn down).
  cutAll() {
    for (const c of this.conns) { c.client.resetAndDestroy(); c.upstream.destroy(); }
    this.stats.cuts += this.conns.size;
    this.conns.clear();
  }

  // The next n answers are cut half-way (see above).
  cutAnswers(n) { this.cutAnswersLeft = n; }

  // Keeps back everything the server sends (a server, or a path, slow in one direction only:
  // an MQTT client's PUBACKs late, its own publishes not), until release() forwards it all in
  // order.
  holdAnswers() { this.holding = true; }

  release() {
    this.holding = false;
    for (const { client, data } of this.held.splice(0)) if (!client.destroyed) client.write(data);
  }

  // Points new connections elsewhere; open ones are cut, so that none keeps the old peer.
  switchTo(target) { this.target = target; this.cutAll(); }

  async close() {
    this.cutAll();
    this.server.close();
    await once(this.server, 'close');
  }
}
