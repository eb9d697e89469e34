#!/bin/sh
# Check matmul against checksums of the products of known matrices.
status=0
for case in "1 60" "2 1818555" "3 36554213717985" "17 2336590670607161935" "64 11830439041708153370" "100 1456770230620091430"; do
    set -- $case
    got=$(./main "$1")
    if [ "$got" != "$2" ]; then
        echo "FAIL matmul($1): expected checksum $2, got $got"
        status=1
    fi
done
[ $status -eq 0 ] && echo "all tests passed"
exit $status
