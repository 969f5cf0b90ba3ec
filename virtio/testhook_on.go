//go:build vublk_testhooks

package virtio

import "os"

// skipDataLog, only in a binary built with -tags vublk_testhooks and VUBLK_TESTHOOK_NO_DATA_LOG=1
// in its environment, leaves read data and GET_ID data out of the dirty log (the status byte and
// the used ring are still logged, so the guest keeps running): a broken logger, for the
// migration test to show that its checksum check catches one. Normal builds cannot turn it on.
var skipDataLog = os.Getenv("VUBLK_TESTHOOK_NO_DATA_LOG") == "1"
