/* SPDX-License-Identifier: MIT */
/* libFuzzer target for the parsers of src/attest.c (iothub-protocol(7) "Attestation"): the first
 * byte chooses the parser (even: the cloud's challenge answer, odd: the DER length of an EK
 * certificate read from its NV index), the rest is the input as received. What a parser accepts
 * must satisfy what attest_answer() and the registration rely on; what it refuses leaves the
 * output untouched. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "iothub/attest.h"
#include "check.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        const uint8_t *buf = data + 1;
        size_t len;
        int r;

        if (size < 1)
                return 0;
        len = size - 1;
        if (data[0] % 2 == 0) {
                struct attest_challenge ch, before;

                memset(&ch, 0xa5, sizeof ch);
                before = ch;
                r = attest_parse_challenge((const char *) buf, len, &ch);
                if (r < 0) {
                        CHECK(r == -EBADMSG);
                        CHECK(memcmp(&ch, &before, sizeof ch) == 0);
                        return 0;
                }
                CHECK(len <= ATTEST_ANSWER_MAX);
                CHECK(ch.nonce_len >= ATTEST_NONCE_MIN && ch.nonce_len <= ATTEST_NONCE_MAX);
                CHECK(ch.credential_len >= 5 && ch.credential_len <= ATTEST_CREDENTIAL_MAX);
                CHECK(ch.secret_len >= 1 && ch.secret_len <= ATTEST_SECRET_MAX);
        } else {
                size_t got = 7;

                r = attest_der_len(len ? buf : NULL, len, &got);
                if (r < 0) {
                        CHECK(r == -EBADMSG && got == 7);
                        return 0;
                }
                CHECK(got >= 2 && got <= len);
                CHECK((buf[0] & 0x1f) != 0x1f);
        }
        return 0;
}
