// Hub key attestation, the cloud's side (PROTOCOL.md 5, iothub-protocol(7) "Attestation"), for
// the reference cloud (server.mjs). Independent of the hub's C code and of tpm2-tss: node:crypto
// for X.509, RSA-OAEP, AES, HMAC and ECDSA; the TPM structures are parsed by hand here, after
// TPM 2.0 Library Part 2 ("Structures"), and the credential is made as TPM2_MakeCredential does
// (Part 1, 24 "Credential Protection"; Part 3, 12.6).
//
//   const att = createAttestation({ trustedRoots: [pem], intermediates: [pem], require: true });
//   challenge(hubId, kid, body)           -> { nonce, credential, secret }   (base64url)
//   verify(hubId, kid, jwk, attestation)  -> { ekSubject, ekIssuer, ekSerial, akName }
// Both throw AttestError(kind, message, status): the cloud answers status {error: kind}.
import crypto from 'node:crypto';

export class AttestError extends Error {
  constructor(kind, message, status = 403) { super(message); this.kind = kind; this.status = status; }
}
const malformed = (what) => new AttestError('attest_malformed', what, 400);

// --- TPM constants (Part 2) --------------------------------------------------------------
const TPM_GENERATED_VALUE = 0xff544347; // Part 2, 6.2
const TPM_ST_ATTEST_CERTIFY = 0x8017; // Part 2, 6.9
const ALG = { RSA: 0x0001, SHA256: 0x000b, NULL: 0x0010, ECDSA: 0x0018, ECC: 0x0023, AES: 0x0006, CFB: 0x0043 };
const ECC_NIST_P256 = 0x0003; // Part 2, 6.4
const TPM_RH_ENDORSEMENT = 0x4000000b; // Part 2, 7.4
// TPMA_OBJECT (Part 2, 8.3)
const A = { fixedTPM: 1 << 1, fixedParent: 1 << 4, sensitiveDataOrigin: 1 << 5, userWithAuth: 1 << 6,
  restricted: 1 << 16, decrypt: 1 << 17, sign: 1 << 18 };
const TCG_EK_CERTIFICATE_EKU = '2.23.133.8.1'; // TCG EK Credential Profile 2.0, 3.2.17 tcg-kp-EKCertificate

export const NONCE_BYTES = 32;
export const CREDENTIAL_BYTES = 32;
const LIMITS = { ek_cert: 4096, ak_public: 1024, key_public: 1024, secret: 64, certify_info: 1024, certify_sig: 256, nonce: 64 };

// --- a bounds-checked reader of the TPM's big-endian wire format --------------------------
class Reader {
  constructor(buf, what) { this.b = buf; this.o = 0; this.what = what; }
  need(n) { if (this.o + n > this.b.length) throw malformed(`${this.what}: truncated at offset ${this.o}`); }
  u8() { this.need(1); return this.b[this.o++]; }
  u16() { this.need(2); const v = this.b.readUInt16BE(this.o); this.o += 2; return v; }
  u32() { this.need(4); const v = this.b.readUInt32BE(this.o); this.o += 4; return v; }
  u64() { this.need(8); const v = this.b.readBigUInt64BE(this.o); this.o += 8; return v; }
  bytes(n) { this.need(n); const v = this.b.subarray(this.o, this.o + n); this.o += n; return v; }
  tpm2b() { return this.bytes(this.u16()); } // Part 2, 10.4: UINT16 size, then the octets
  end() { if (this.o !== this.b.length) throw malformed(`${this.what}: ${this.b.length - this.o} trailing bytes`); }
}

// TPMT_PUBLIC of an ECC key (Part 2, 12.2.4), from a TPM2B_PUBLIC. Returns the parsed fields and
// the TPMT_PUBLIC octets (what the Name is computed over). Anything but an ECC key is refused.
export function parseEccPublic(tpm2b, what) {
  const outer = new Reader(tpm2b, what);
  const area = outer.tpm2b();
  outer.end();
  const r = new Reader(area, what);
  const p = { type: r.u16(), nameAlg: r.u16(), attributes: r.u32(), authPolicy: r.tpm2b() };
  if (p.type !== ALG.ECC) throw new AttestError('attest_key_type', `${what} is not an ECC key (type 0x${p.type.toString(16)})`);
  // TPMS_ECC_PARMS (Part 2, 12.2.3.6): symmetric, scheme, curveID, kdf; each algorithm
  // selector is followed by its details unless it is TPM_ALG_NULL.
  p.symmetric = r.u16();
  if (p.symmetric !== ALG.NULL) { r.u16(); r.u16(); }
  p.scheme = r.u16();
  if (p.scheme !== ALG.NULL) p.schemeHash = r.u16();
  p.curve = r.u16();
  p.kdf = r.u16();
  if (p.kdf !== ALG.NULL) r.u16();
  p.x = r.tpm2b(); // TPMS_ECC_POINT (Part 2, 11.2.5.2)
  p.y = r.tpm2b();
  r.end();
  if (p.nameAlg !== ALG.SHA256) throw new AttestError('attest_key_type', `${what}: name algorithm is not SHA-256`);
  if (p.curve !== ECC_NIST_P256 || p.x.length > 32 || p.y.length > 32) throw new AttestError('attest_key_type', `${what} is not a P-256 key`);
  p.area = area;
  // Part 1, 16 "Names": nameAlg || H_nameAlg(TPMT_PUBLIC)
  p.name = tpmName(area);
  return p;
}

const u16be = (v) => { const b = Buffer.alloc(2); b.writeUInt16BE(v); return b; };
const u32be = (v) => { const b = Buffer.alloc(4); b.writeUInt32BE(v); return b; };
const sha256 = (...parts) => crypto.createHash('sha256').update(Buffer.concat(parts)).digest();
export const tpmName = (area) => Buffer.concat([u16be(ALG.SHA256), sha256(area)]);
const pad32 = (b) => Buffer.concat([Buffer.alloc(32 - b.length), b]);
const has = (attrs, ...names) => names.every((n) => (attrs & A[n]) !== 0);

function eccKeyObject(p) {
  return crypto.createPublicKey({ key: { kty: 'EC', crv: 'P-256', x: pad32(p.x).toString('base64url'), y: pad32(p.y).toString('base64url') }, format: 'jwk' });
}

// --- TPM2_MakeCredential (Part 1, 24; Part 3, 12.6) -----------------------------------------

// KDFa, Part 1, 11.4.10.2: counter-mode KDF of SP 800-108 with HMAC; the label is followed by a
// zero octet, then contextU, contextV and the number of bits, all big-endian.
export function kdfa(key, label, contextU, contextV, bits) {
  const out = [];
  const L = Buffer.concat([Buffer.from(label, 'latin1'), Buffer.from([0])]);
  for (let i = 1, got = 0; got < bits / 8; i++) {
    const h = crypto.createHmac('sha256', key).update(Buffer.concat([u32be(i), L, contextU, contextV, u32be(bits)])).digest();
    out.push(h);
    got += h.length;
  }
  return Buffer.concat(out).subarray(0, bits / 8);
}

// For an RSA EK of the TCG default template (nameAlg SHA-256, AES-128-CFB; EK Credential
// Profile 2.0, B.3.3): the seed is encrypted with RSA-OAEP, SHA-256, label "IDENTITY\0"
// (Part 1, B.10.4 "Secret Sharing" and 24.3: the label is the usage, with its zero octet). The
// credential is protected by a key and an HMAC key derived from the seed and the AK's Name:
//   symKey     = KDFa(SHA-256, seed, "STORAGE", akName, "", 128)      (24.4)
//   encIdentity = AES-128-CFB(symKey, IV = 0, TPM2B(credential))      (24.4)
//   hmacKey    = KDFa(SHA-256, seed, "INTEGRITY", "", "", 256)          (24.5)
//   outerHMAC  = HMAC-SHA-256(hmacKey, encIdentity || akName)          (24.5)
//   credentialBlob = TPM2B(outerHMAC) || encIdentity                   (Part 2, 12.4.2 TPMS_ID_OBJECT)
export function makeCredential(ekPublicKey, akName, credential) {
  const seed = crypto.randomBytes(32);
  const secret = crypto.publicEncrypt({ key: ekPublicKey, padding: crypto.constants.RSA_PKCS1_OAEP_PADDING,
    oaepHash: 'sha256', oaepLabel: Buffer.from('IDENTITY\0', 'latin1') }, seed);
  const symKey = kdfa(seed, 'STORAGE', akName, Buffer.alloc(0), 128);
  const c = crypto.createCipheriv('aes-128-cfb', symKey, Buffer.alloc(16));
  const encIdentity = Buffer.concat([c.update(Buffer.concat([u16be(credential.length), credential])), c.final()]);
  const hmacKey = kdfa(seed, 'INTEGRITY', Buffer.alloc(0), Buffer.alloc(0), 256);
  const outerHmac = crypto.createHmac('sha256', hmacKey).update(Buffer.concat([encIdentity, akName])).digest();
  return { credentialBlob: Buffer.concat([u16be(outerHmac.length), outerHmac, encIdentity]), secret };
}

// --- TPMS_ATTEST (Part 2, 10.12.12) and TPMT_SIGNATURE (Part 2, 11.3.4) ----------------------

export function parseCertifyInfo(buf) {
  const r = new Reader(buf, 'certify_info');
  const a = { magic: r.u32(), type: r.u16(), qualifiedSigner: r.tpm2b(), extraData: r.tpm2b() };
  // TPMS_CLOCK_INFO (10.11.1): clock, resetCount, restartCount, safe; then firmwareVersion
  a.clock = r.u64(); r.u32(); r.u32(); r.u8();
  a.firmwareVersion = r.u64();
  if (a.magic !== TPM_GENERATED_VALUE) throw new AttestError('attest_certify', 'certify_info: magic is not TPM_GENERATED_VALUE');
  if (a.type !== TPM_ST_ATTEST_CERTIFY) throw new AttestError('attest_certify', `certify_info: type 0x${a.type.toString(16)} is not TPM_ST_ATTEST_CERTIFY`);
  // TPMS_CERTIFY_INFO (10.12.3): name, qualifiedName of the certified object
  a.name = r.tpm2b();
  a.qualifiedName = r.tpm2b();
  r.end();
  return a;
}

export function parseEcdsaSignature(buf) {
  const r = new Reader(buf, 'certify_sig');
  const alg = r.u16();
  if (alg !== ALG.ECDSA) throw new AttestError('attest_signature', `certify_sig: algorithm 0x${alg.toString(16)} is not ECDSA`);
  const hash = r.u16();
  if (hash !== ALG.SHA256) throw new AttestError('attest_signature', 'certify_sig: hash is not SHA-256');
  const R = r.tpm2b(), S = r.tpm2b();
  r.end();
  if (R.length > 32 || S.length > 32) throw new AttestError('attest_signature', 'certify_sig: r or s longer than 32 octets');
  return Buffer.concat([pad32(R), pad32(S)]);
}

// --- the verifier --------------------------------------------------------------------------

function b64u(o, name) {
  const v = o[name];
  if (typeof v !== 'string' || !/^[A-Za-z0-9_-]+$/.test(v) || v.length > Math.ceil(LIMITS[name] * 4 / 3)) throw malformed(`${name} is not base64url of at most ${LIMITS[name]} bytes`);
  return Buffer.from(v, 'base64url');
}

const toX509 = (pem) => new crypto.X509Certificate(pem);

export function createAttestation({ trustedRoots = [], intermediates = [], require = false, challengeTtlS = 300, maxChallenges = 1000 } = {}) {
  const roots = trustedRoots.map(toX509);
  const inter = intermediates.map(toX509);
  const challenges = new Map(); // nonce (base64url) -> { hub, kid, ekDer, akName, credential, expires }
  const state = { require, challenges: 0, verified: 0, refused: {}, seen: [] };
  // Test instruments: an attacker in control of the hub's software changes what the hub sends.
  const hooks = { challenge: null, evidence: null };

  // The EK certificate chains to a trusted TPM vendor root through the known intermediates
  // (RFC 5280 6.1, in its simple form: issuer name, signature, validity, CA flag), is an EK
  // certificate (its EKU), and holds an RSA 2048 key (the TCG default EK, B.3.3).
  function checkEkCert(der) {
    let ek;
    try { ek = new crypto.X509Certificate(der); } catch (e) { throw new AttestError('attest_ek_cert', `ek_cert is not an X.509 certificate: ${e.message}`); }
    const now = Date.now();
    const valid = (c) => Date.parse(c.validFrom) <= now && now <= Date.parse(c.validTo);
    if (!valid(ek)) throw new AttestError('attest_ek_cert', 'the EK certificate is not valid now');
    if (!(ek.keyUsage ?? []).includes(TCG_EK_CERTIFICATE_EKU)) throw new AttestError('attest_ek_cert', 'the certificate is not an EK certificate (no tcg-kp-EKCertificate)');
    const k = ek.publicKey;
    if (k.asymmetricKeyType !== 'rsa' || k.asymmetricKeyDetails.modulusLength !== 2048) throw new AttestError('attest_ek_cert', 'the EK is not RSA 2048 (the only EK this cloud takes)');
    let c = ek;
    for (let depth = 0; depth < 5; depth++) {
      const root = roots.find((r) => c.checkIssued(r) && c.verify(r.publicKey));
      if (root) {
        if (!valid(root)) throw new AttestError('attest_ek_cert', 'the trusted root is not valid now');
        return ek;
      }
      const up = inter.find((i) => i.ca && valid(i) && c.checkIssued(i) && c.verify(i.publicKey));
      if (!up) break;
      c = up;
    }
    throw new AttestError('attest_ek_cert', `the EK certificate (issuer "${ek.issuer}") does not chain to a trusted TPM vendor CA`);
  }

  // The AK: a restricted signing key bound to its TPM (Part 1, 25.3 "Restricted Signing Key": it
  // signs only structures the TPM made, which begin with TPM_GENERATED_VALUE).
  function checkAk(akPublic) {
    const ak = parseEccPublic(akPublic, 'ak_public');
    if (!has(ak.attributes, 'fixedTPM', 'fixedParent', 'sensitiveDataOrigin', 'restricted', 'sign') || has(ak.attributes, 'decrypt'))
      throw new AttestError('attest_ak', 'ak_public is not a restricted signing key bound to its TPM');
    if (ak.scheme !== ALG.ECDSA || ak.schemeHash !== ALG.SHA256) throw new AttestError('attest_ak', 'the AK is not bound to ECDSA with SHA-256');
    return ak;
  }

  function prune(now) {
    for (const [n, ch] of challenges) if (ch.expires <= now) challenges.delete(n);
  }

  function challenge(hub, kid, body) {
    if (hooks.challenge) body = hooks.challenge(body);
    const ekDer = b64u(body, 'ek_cert');
    const akPublic = b64u(body, 'ak_public');
    const ek = checkEkCert(ekDer);
    const ak = checkAk(akPublic);
    const now = Date.now();
    prune(now);
    // One live challenge per hub: a new one replaces the last.
    for (const [n, ch] of challenges) if (ch.hub === hub) challenges.delete(n);
    if (challenges.size >= maxChallenges) throw new AttestError('attest_busy', 'too many open challenges', 503);
    const nonce = crypto.randomBytes(NONCE_BYTES);
    const credential = crypto.randomBytes(CREDENTIAL_BYTES);
    const { credentialBlob, secret } = makeCredential(ek.publicKey, ak.name, credential);
    challenges.set(nonce.toString('base64url'), { hub, kid, ekDer, akPublic, akName: ak.name, credential, expires: now + challengeTtlS * 1000 });
    state.challenges++;
    return { nonce: nonce.toString('base64url'), credential: credentialBlob.toString('base64url'), secret: secret.toString('base64url') };
  }

  // The registration's evidence, checked in this order (each refusal has its own kind):
  //  1. the nonce is that of an open challenge of this hub and key, used once (attest_replay);
  //  2. the EK certificate and AK are those the challenge was made for (attest_challenge_mismatch);
  //  3. the TPMS_ATTEST is a TPM2_Certify whose extraData is this nonce (attest_replay);
  //  4. the activated secret is the credential: the AK is in the TPM of the EK (attest_credential);
  //  5. the AK signed the TPMS_ATTEST, as the AK of the endorsement hierarchy (attest_signature);
  //  6. the certified object is the key_public given, a key that cannot leave its TPM, whose
  //     point is the registered JWK (attest_wrong_key, attest_key_attributes).
  function verify(hub, kid, jwk, attestation) {
    if (hooks.evidence) attestation = hooks.evidence(attestation);
    const names = ['nonce', 'ek_cert', 'ak_public', 'secret', 'certify_info', 'certify_sig', 'key_public'];
    if (attestation === null || typeof attestation !== 'object' || Array.isArray(attestation) ||
        Object.keys(attestation).length !== names.length || !names.every((n) => Object.hasOwn(attestation, n)))
      throw malformed(`attestation must have exactly the members ${names.join(', ')}`);
    const f = Object.fromEntries(names.map((n) => [n, b64u(attestation, n)]));
    state.seen.push({ hub, kid, attestation });

    const ch = challenges.get(attestation.nonce);
    if (ch) challenges.delete(attestation.nonce); // used once, whatever the outcome
    if (!ch || ch.expires <= Date.now()) throw new AttestError('attest_replay', 'no open challenge has this nonce (used, expired or never issued)');
    if (ch.hub !== hub || ch.kid !== kid) throw new AttestError('attest_challenge_mismatch', 'the challenge was issued to another hub or key');
    if (!f.ek_cert.equals(ch.ekDer) || !f.ak_public.equals(ch.akPublic)) throw new AttestError('attest_challenge_mismatch', 'ek_cert or ak_public is not what the challenge was made for');

    const info = parseCertifyInfo(f.certify_info);
    if (!info.extraData.equals(f.nonce)) throw new AttestError('attest_replay', 'the certification is not for this challenge (extraData is another nonce)');

    if (f.secret.length !== ch.credential.length || !crypto.timingSafeEqual(f.secret, ch.credential))
      throw new AttestError('attest_credential', 'the activated secret is wrong: the AK is not in the TPM of the EK certificate');

    const ak = parseEccPublic(f.ak_public, 'ak_public');
    const sig = parseEcdsaSignature(f.certify_sig);
    if (!crypto.verify('sha256', f.certify_info, { key: eccKeyObject(ak), dsaEncoding: 'ieee-p1363' }, sig))
      throw new AttestError('attest_signature', 'the certification does not verify with the AK');
    // Part 1, 16 "Qualified Name": QN(primary) = nameAlg || H(QN(hierarchy) || Name), the QN of a
    // hierarchy being its handle: the signer is the AK as a primary key of the endorsement hierarchy.
    const qn = Buffer.concat([u16be(ALG.SHA256), sha256(u32be(TPM_RH_ENDORSEMENT), ak.name)]);
    if (!info.qualifiedSigner.equals(qn)) throw new AttestError('attest_signature', 'the signer is not the AK of the endorsement hierarchy');

    const key = parseEccPublic(f.key_public, 'key_public');
    if (!info.name.equals(key.name)) throw new AttestError('attest_wrong_key', 'the certification is about another key than key_public');
    if (!has(key.attributes, 'fixedTPM', 'fixedParent', 'sensitiveDataOrigin', 'sign') || has(key.attributes, 'decrypt') || has(key.attributes, 'restricted'))
      throw new AttestError('attest_key_attributes', 'the hub key is not a signing key generated in and bound to its TPM (fixedTPM, fixedParent, sensitiveDataOrigin)');
    if (pad32(key.x).toString('base64url') !== jwk.x || pad32(key.y).toString('base64url') !== jwk.y)
      throw new AttestError('attest_wrong_key', 'the certified key is not the key being registered');

    const ek = new crypto.X509Certificate(f.ek_cert);
    state.verified++;
    return { ekSubject: ek.subject, ekIssuer: ek.issuer, ekSerial: ek.serialNumber, akName: ak.name.toString('hex') };
  }

  return { state, hooks, challenge, verify, get require() { return state.require; }, set require(v) { state.require = v; } };
}
