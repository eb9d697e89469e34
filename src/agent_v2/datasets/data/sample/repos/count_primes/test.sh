#!/bin/sh
# Check count_primes against known prime counts.
status=0
for case in "0 0" "2 0" "3 1" "10 4" "100 25" "1000 168" "7919 999" "7920 1000" "10000 1229"; do
    set -- $case
    got=$(./main "$1")
    if [ "$got" != "$2" ]; then
        echo "FAIL count_primes($1): expected $2, got $got"
        status=1
    fi
done
[ $status -eq 0 ] && echo "all tests passed"
exit $status
